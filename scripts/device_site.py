"""Make this checkout importable as the ``loraserve`` distribution without installing it (the GPU machine).

Writes ``DIR/loraserve`` (links to ``core/``'s entries and ``plugins/``, as pyproject.toml's
package-dir maps them) and ``DIR/loraserve-VERSION.dist-info`` with the entry points, so plugins are
discovered exactly as from an install. Then ``export PYTHONPATH=DIR``. For machines where
``pip install -e .`` cannot run (no network for build requirements); a checkout change shows at once.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def build(target: Path) -> Path:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    package = target / "loraserve"
    if package.exists():
        shutil.rmtree(package)
    package.mkdir(parents=True)
    for entry in (ROOT / "core").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "plugins").symlink_to(ROOT / "plugins")
    info = target / f"loraserve-{project['version']}.dist-info"
    if info.exists():
        shutil.rmtree(info)
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: loraserve\nVersion: {project['version']}\n")
    lines = [
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in eps.items())
        for group, eps in project.get("entry-points", {}).items()
    ]
    scripts = project.get("scripts", {})
    if scripts:
        lines.append("[console_scripts]\n" + "".join(f"{n} = {v}\n" for n, v in scripts.items()))
    (info / "entry_points.txt").write_text("\n".join(lines))
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="the directory to put on PYTHONPATH")
    print(build(parser.parse_args().target.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
