"""Recipes in: YAML loading (bounded, safe_load), `--set key.path=value` overrides, and error messages.

`load_recipe` is the only way in; every user mistake becomes one RecipeError listing all problems,
each with its dotted key path (and file line) and a suggestion. The schema itself is in schema.py;
its models are re-exported here, so `pfp_deploy.recipe.Recipe` keeps working.
"""
from __future__ import annotations

import copy
import re
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from pfp_deploy.errors import RecipeError, closest
from pfp_deploy.schema import (  # noqa: F401 (re-exported: recipe.Recipe, recipe.PruneConfig, ... are documented)
    DEFAULT_FASHION_MNIST_ROOT,
    AccuracyCheck,
    ChecksConfig,
    DataConfig,
    DistillConfig,
    ExportConfig,
    FinetuneConfig,
    LatencyConfig,
    LayerOverride,
    ModelConfig,
    OnnxConfig,
    OpenVINOConfig,
    OptimizerConfig,
    ParityConfig,
    PruneConfig,
    Recipe,
    ReconstructConfig,
    ReportConfig,
    SyntheticConfig,
    TargetConfig,
    TrainConfig,
    _Problems,
)

# Bounds for untrusted YAML: the largest shipped recipe is ~4 KB and ~300 values.
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


# ------------------------------------------------------------------------------------- loading

def load_recipe(source: str | Path | dict | Recipe, overrides: Iterable[str] = ()) -> Recipe:
    """Validate a recipe from a YAML path, a dict or a Recipe, after applying `key.path=value` overrides.

    Raises RecipeError with every problem, one line each, naming the dotted key (and file line).
    """
    overrides = list(overrides)
    origin, lines = "", {}  # a file's path; empty for a dict or Recipe (nothing to point at)
    if isinstance(source, Recipe):
        if not overrides:
            return source
        raw = source.model_dump(mode="json", exclude_unset=True)
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)
    elif isinstance(source, (str, Path)):
        origin = str(source)
        raw, lines = read_yaml(Path(source))
    else:
        raise RecipeError(f"load_recipe() takes a YAML path, a dict or a Recipe, got {type(source).__name__}")
    overridden = [_apply_override(raw, item) for item in overrides]
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, origin, lines, overridden)) from None


def read_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    """Parse a recipe file: (data, {key path: 1-based line}); duplicate keys are errors."""
    if not path.is_file():
        where = "is a directory, not a file" if path.is_dir() else "does not exist"
        examples = sorted(str(p) for p in Path("recipes").glob("*.yaml"))[:4]
        hint = f" Examples: {', '.join(examples)}" if examples else ""
        raise RecipeError(f"Recipe file {path} {where}. Pass the path of a YAML recipe.{hint}")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"Recipe {path} is {size:,} bytes; recipes are at most {MAX_RECIPE_BYTES:,} "
                              "bytes (a recipe is a page of settings, not data)")
        with path.open("rb") as f:  # read no more than the limit, even if the file grows meanwhile
            text = f.read(MAX_RECIPE_BYTES + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"Cannot read recipe {path}: {exc}. Recipes are UTF-8 YAML text files.") from None
    node, data = parse_yaml_bounded(text, str(path))
    if data is None:
        raise RecipeError(f"Recipe file {path} is empty. Start from recipes/fashion_mnist_quickstart.yaml.")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: the recipe must be a mapping of sections (version, name, model, "
                          f"data, ...), got a {type(data).__name__}")
    lines: dict[tuple, int] = {}
    _index_lines(node, (), lines, path)
    return data, lines


def validate_section(model: type[BaseModel], data: Any, where: str) -> Any:
    """One section of a recipe (e.g. FinetuneConfig from a dict passed to the Python API), with the
    recipe's error messages: RecipeError, one line per problem, naming `where`.key ("prune.keep"), or
    the keyword argument when `where` is a call ("prune(): keep")."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        joiner = ": " if where.endswith(")") else "."
        lines = [f"  {where}{joiner}{_dotted(loc)}: {msg}" if loc else f"  {where}: {msg}"
                 for loc, msg in _problems(exc, model)]
        raise RecipeError(f"Invalid {where} settings ({len(lines)} problem{'s' * (len(lines) > 1)}):\n"
                          + "\n".join(lines)) from None


def parse_yaml_bounded(text: str, origin: str, max_nodes: int = MAX_YAML_NODES) -> tuple[Any, Any]:
    """(node tree, data) of YAML text with safe_load semantics, refusing text that would expand past
    `max_nodes` values: an alias bomb (anchors nested in aliases) is a few hundred bytes that expand
    to billions of values, so the composed tree is measured, aliases counted at full size, first."""
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{origin}: {len(text):,} characters of YAML; at most {MAX_RECIPE_BYTES:,} are read")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # aliases stay shared here: cheap
        _check_expansion(node, origin, max_nodes)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark else origin
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: YAML syntax error: {problem}. Check the indentation and that "
                          "every 'key:' is followed by a space.") from None
    return node, data


def _check_expansion(root: yaml.Node | None, origin: str, max_nodes: int) -> None:
    """Count the values `root` expands to (each alias at the full size of its anchor), iteratively
    with one memo per node, so the count itself is linear in the text; a recursive alias is refused."""
    if root is None:
        return
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if not children_done:
            if key in on_path:
                raise RecipeError(f"{origin}:{node.start_mark.line + 1}: a YAML alias refers to itself "
                                  "(a recursive anchor); recipes must be trees")
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        on_path.discard(key)
        sizes[key] = 1 + sum(sizes[id(child)] for child in children)
        if sizes[key] > max_nodes:
            raise RecipeError(f"{origin}:{node.start_mark.line + 1}: this YAML expands to more than "
                              f"{max_nodes:,} values through anchors and aliases (&name / *name); a recipe "
                              "needs far fewer. Write the values out, or remove the nested aliases.")


def _index_lines(node: yaml.Node, at: tuple, lines: dict[tuple, int], path: Path) -> None:
    lines[at] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                dotted = _dotted(at + (key,))
                raise RecipeError(f"{path}:{key_node.start_mark.line + 1}: duplicate key {dotted} "
                                  f"(first defined on line {seen[key]}); merge the two entries")
            seen[key] = key_node.start_mark.line + 1
            _index_lines(value_node, at + (key,), lines, path)
            lines[at + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, at + (i,), lines, path)


# ----------------------------------------------------------------------------------- overrides

def _split_path(path: str) -> list[str | int]:
    """'checks.targets[0].batch' or 'checks.targets.0.batch' -> ['checks', 'targets', 0, 'batch']."""
    parts: list[str | int] = []
    for piece in path.replace("[", ".").replace("]", "").split("."):
        if piece == "":
            raise RecipeError(f"--set {path!r}: empty key in the path")
        parts.append(int(piece) if piece.isdigit() else piece)
    return parts


def _apply_override(raw: dict, item: str) -> tuple:
    """Apply one `key.path=value` to the raw recipe dict; returns the key path."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {item!r}: expected key.path=value, e.g. --set finetune.epochs=2")
    try:
        _, value = parse_yaml_bounded(text, f"--set {key}")
    except RecipeError as exc:
        raise RecipeError(f"--set {item[:200]!r}: the value is not valid YAML ({exc}). Quote strings "
                          "that contain ':' or '#'.") from None
    parts = _split_path(key)
    node: Any = raw
    schema: Any = Recipe
    for depth, part in enumerate(parts):
        here = _dotted(parts[:depth]) or "the recipe"
        schema = _strip_optional(schema)
        if _is_model(schema):
            if not isinstance(part, str) or part not in schema.model_fields:
                valid = list(schema.model_fields)
                hint = closest(str(part), valid)
                hint = f' Did you mean "{_dotted(parts[:depth] + [hint])}"?' if hint else ""
                raise RecipeError(f"--set {key}: unknown key {part!r} in {here}.{hint} "
                                  f"Valid keys: {', '.join(valid)}")
            schema = schema.model_fields[part].annotation
        elif get_origin(schema) is list:
            if not isinstance(part, int):
                raise RecipeError(f"--set {key}: {here} is a list; address an entry by index, "
                                  f"e.g. {here}[0], or set the whole list")
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise RecipeError(f"--set {key}: {here} has {size} entries, so index {part} does not "
                                  "exist; set the whole list instead")
            schema = get_args(schema)[0]
        elif get_origin(schema) is dict:
            schema = get_args(schema)[1]
        else:
            raise RecipeError(f"--set {key}: {here} is a value, not a section; use --set {here}=...")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            child = node[part] if isinstance(node, list) else node.get(part)
            if not isinstance(child, (dict, list)):
                child = {}
                node[part] = child
            node = child
    return tuple(parts)


# ------------------------------------------------------------------------------ error messages

def _format_errors(exc: ValidationError, origin: str, lines: dict[tuple, int], overridden: list[tuple]) -> str:
    """One line per problem: '<file>:<line>: <dotted.key>: <what is wrong>'."""
    out = []
    for loc, msg in sorted(_problems(exc, Recipe), key=lambda item: _line_of(item[0], lines)):
        prefix = _where(loc, origin, lines, overridden)
        out.append(f"  {prefix}{_dotted(loc) or '(top level)'}: {msg}")
    noun = "problem" if len(out) == 1 else "problems"
    return f"Invalid recipe{' ' + origin if origin else ''} ({len(out)} {noun}):\n" + "\n".join(out)


def _problems(exc: ValidationError, root: type[BaseModel]) -> list[tuple[tuple, str]]:
    """(key path, what is wrong) per validation error of `root` (a Recipe or one of its sections)."""
    messages: list[tuple[tuple, str]] = []
    unions: dict[tuple, list[dict]] = {}
    for err in exc.errors():
        clean, info, is_union = _schema_at(err["loc"], root)
        if is_union:
            unions.setdefault(clean, []).append(err)
            continue
        if err["type"] == "value_error" and isinstance(err.get("ctx", {}).get("error"), _Problems):
            for rel, msg in err["ctx"]["error"].problems:
                messages.append((clean + tuple(_split_path(rel)), msg))
            continue
        messages.append((clean, _describe(err, clean, info, root)))
    for clean, errs in unions.items():
        expected = " or ".join(dict.fromkeys(_expected(e["msg"]) for e in errs))
        messages.append((clean, f"expected {expected}, got {_show(errs[0]['input'])}"))
    return messages


def _line_of(loc: tuple, lines: dict[tuple, int]) -> int:
    """Line of the key, else of its nearest enclosing key (0 when unknown)."""
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return 0


def _where(loc: tuple, origin: str, lines: dict[tuple, int], overridden: list[tuple]) -> str:
    if any(loc[: len(o)] == o for o in overridden):
        return "(from --set) "
    line = _line_of(loc, lines)
    return f"{origin}:{line}: " if line else ""


def _describe(err: dict, loc: tuple, info: Any, root: type[BaseModel] = Recipe) -> str:
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        parent_loc = loc[:-1]
        model = _model_at(parent_loc, root)
        valid = list(model.model_fields) if model else []
        hint = closest(str(loc[-1]), valid)
        hint = f' Did you mean "{_dotted(parent_loc + (hint,))}"?' if hint else ""
        return f"unknown key.{hint} Valid keys here: {', '.join(valid)}"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'|(\d+)", err["ctx"]["expected"])
        options = [a or b for a, b in options]
        hint = closest(str(value), options)
        hint = f' Did you mean "{hint}"?' if hint else ""
        return f"got {_show(value)}; valid values: {', '.join(options)}.{hint}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"must be {_bounds(info, err['ctx'])}, got {_show(value)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping of keys (a section), got {_show(value)}"
    if kind == "value_error":
        return str(err["ctx"]["error"])
    msg = err["msg"]
    if msg.startswith("Input should be "):
        return f"expected {_expected(msg)}, got {_show(value)}"
    return f"{msg[0].lower()}{msg[1:]}, got {_show(value)}"


def _expected(msg: str) -> str:
    return msg.removeprefix("Input should be ").split(",")[0]


def _bounds(info: Any, ctx: dict) -> str:
    """'in (0, 1]' from the field's constraints; falls back to the violated one."""
    limits: dict[str, Any] = {}
    for meta in getattr(info, "metadata", []) or []:
        for name in ("gt", "ge", "lt", "le"):
            if getattr(meta, name, None) is not None:
                limits[name] = getattr(meta, name)
    limits = limits or dict(ctx)
    low = ("(", limits["gt"]) if "gt" in limits else ("[", limits["ge"]) if "ge" in limits else None
    high = (")", limits["lt"]) if "lt" in limits else ("]", limits["le"]) if "le" in limits else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>' if low[0] == '(' else '>='} {low[1]}"
    return f"{'<' if high[0] == ')' else '<='} {high[1]}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dotted(parts: Iterable) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_]\w*", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f'["{part}"]'
    return out


# ------------------------------------------------------------------------------ schema walking

def _strip_optional(ann: Any) -> Any:
    if get_origin(ann) is Annotated:
        return _strip_optional(get_args(ann)[0])
    if get_origin(ann) in (Union, types.UnionType):
        rest = [a for a in get_args(ann) if a is not type(None)]
        if len(rest) == 1:
            return _strip_optional(rest[0])
    return ann


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _field_info(ann: Any) -> Any:
    """The FieldInfo inside Annotated[x, Field(...)] (list items, dict values), else None."""
    if get_origin(ann) is Annotated:
        for meta in get_args(ann)[1:]:
            if hasattr(meta, "metadata"):
                return meta
    return None


def _schema_at(loc: tuple, root: type[BaseModel] = Recipe) -> tuple[tuple, Any, bool]:
    """Follow an error location through the schema: (location without union tags, FieldInfo, is_union)."""
    schema: Any = root
    info = None
    clean: list = []
    for part in loc:
        base = _strip_optional(schema)
        if _is_model(base) and part in base.model_fields:
            info = base.model_fields[part]
            schema = info.annotation
        elif get_origin(base) in (list, dict) and not _is_model(base):
            schema = get_args(base)[-1]
            info = _field_info(schema)
        elif get_origin(base) in (Union, types.UnionType):
            return tuple(clean), info, True  # pydantic tags union members; report on the field
        else:
            schema, info = None, None
        clean.append(part)
    return tuple(clean), info, False


def _model_at(loc: tuple, root: type[BaseModel] = Recipe) -> type[BaseModel] | None:
    schema: Any = root
    for part in loc:
        base = _strip_optional(schema)
        if _is_model(base) and part in base.model_fields:
            schema = base.model_fields[part].annotation
        elif get_origin(base) in (list, dict):
            schema = get_args(base)[-1]
        else:
            return None
    base = _strip_optional(schema)
    return base if _is_model(base) else None
