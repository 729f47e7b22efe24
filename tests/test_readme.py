"""The README's and docs' generated blocks equal what the registries and results give
(`python -m dalab.benchmarks.methods_table --write` rewrites them), no count or timing is typed in
prose where it goes stale, the first screen holds what a newcomer needs, and the commands it
documents exist."""

from __future__ import annotations

import re
from pathlib import Path

from dalab.benchmarks.methods_table import BLOCKS, FILES, readme_blocks, rewrite_readme

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_generated_blocks_match_the_registries():
    assert sorted(n for names in FILES.values() for n in names) == sorted(BLOCKS)
    for rel, names in FILES.items():
        blocks = readme_blocks((ROOT / rel).read_text())
        assert set(blocks) == set(names), f"{rel} lacks a generated block; add its markers"
        for name in names:
            assert blocks[name] == BLOCKS[name]().strip(), (
                f"{rel}'s {name} block is stale: run `python -m dalab.benchmarks.methods_table --write`")


def test_rewrite_replaces_only_the_blocks():
    text = "intro\n<!-- generated: methods -->\nold\n<!-- end: methods -->\nmiddle\n" \
           "<!-- generated: selection-rules -->\n<!-- end: selection-rules -->\noutro\n"
    out = rewrite_readme(text, ("methods", "selection-rules"))
    assert out.startswith("intro\n") and "\nmiddle\n" in out and out.endswith("outro\n")
    assert readme_blocks(out) == {n: BLOCKS[n]().strip() for n in ("methods", "selection-rules")}


def test_readme_is_short_and_its_first_screen_has_the_commands_and_an_example():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    first = "\n".join(text.splitlines()[:50])
    assert "make bench" in first and "make test" in first and "dalab bench" in first and "dalab table" in first
    for link in re.findall(r"\]\(((?:docs|results)/[^)#]+)", text):
        assert (ROOT / link).exists(), f"README links to a missing file: {link}"


def test_no_stale_typed_counts_in_prose():
    """Counts of methods and runs, and the suite's or the bench's time, are generated (the counts
    block) -- never typed in prose, where adding one method made several of them wrong."""
    from dalab.methods import METHODS

    outside = re.sub(r"<!-- generated: ([\w-]+) -->.*?<!-- end: \1 -->", "", README.read_text(), flags=re.S)
    docs = "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    for text in (outside, docs):
        assert not re.search(rf"\b{len(METHODS)} (registered )?methods\b", text)
        assert not re.search(r"\b\d+ tests in \d+ s\b", text) and not re.search(r"\*\*\d+ runs\*\*", text)


def test_readme_commands_are_make_targets():
    import shutil
    import subprocess

    for target in ("bench", "test", "tables", "bench-long"):
        assert f"make {target}" in README.read_text()
        if shutil.which("make"):  # make itself resolves the target (pattern rules included)
            r = subprocess.run(["make", "-n", target], cwd=README.parent, capture_output=True, text=True)
            assert r.returncode == 0 and r.stdout.strip(), (target, r.stderr)


def test_the_suite_time_is_read_from_its_measurement_and_says_when_the_cores_were_shared():
    from dalab.benchmarks.methods_table import suite_line

    idle = {"passed": 770, "wall_s": 262.4, "cpu_cores": 2, "other_cores": 0.03, "command": "make test-timing"}
    assert suite_line(idle) == ("`make test`, last measured (`results/test_suite.json`, `make test-timing`): 770 tests "
                                "passed in 262 s (4.4 min) on 2 cores.")
    assert suite_line({**idle, "other_cores": 1.04}).endswith("on 2 cores (other work used 1.0 cores meanwhile).")
    assert "not recorded" in suite_line({k: v for k, v in idle.items() if k != "other_cores"})
