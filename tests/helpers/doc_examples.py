"""docs/extending.md's worked examples, imported the way the doc tells users to: as a file of their own."""
from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from pfp_deploy.registry import Registry

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def doc_example(section: str) -> str:
    """The first python block of the doc's `## <section>`."""
    body = DOC.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


@contextlib.contextmanager
def registered_doc_example(section: str, module_name: str, entry: str, registry: Registry,
                           directory: Path) -> Iterator[object]:
    """Write the section's example to <directory>/<module_name>.py, import it (it registers `entry`),
    yield that entry, and unregister it afterwards."""
    path = directory / f"{module_name}.py"
    path.write_text(doc_example(section))
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield registry.get(entry)
    finally:
        if entry in registry.names():
            registry.unregister(entry)
        sys.modules.pop(spec.name, None)
