"""The installed package: no generic top-level names, and a core that does not need Prefect."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_everything_under_prefect_lora_merge(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("prefect_lora_merge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"prefect_lora_merge"}
    # every module of the tree, subpackages included (a package missing from pyproject's list would be left out)
    modules = [
        f"prefect_lora_merge/{p.relative_to(ROOT / 'src' / 'prefect_lora_merge')}"
        for p in (ROOT / "src" / "prefect_lora_merge").rglob("*.py")
    ]
    modules += [f"prefect_lora_merge/{d}/{p.name}" for d in ("flows", "tasks") for p in (ROOT / d).glob("*.py")]
    assert "prefect_lora_merge/core/plan/planner.py" in modules and "prefect_lora_merge/core/formats/base.py" in modules
    assert sorted(m for m in modules if m not in names) == []


def test_the_merge_core_imports_neither_prefect_nor_the_cli():
    code = (
        "import sys, pkgutil, importlib, prefect_lora_merge.core as core\n"
        "for m in pkgutil.iter_modules(core.__path__): importlib.import_module(f'prefect_lora_merge.core.{m.name}')\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] == 'prefect' or n == 'prefect_lora_merge.cli')\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
