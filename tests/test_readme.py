"""The README's generated tables equal what the registries give (`python -m
dalab.benchmarks.methods_table --write` rewrites them), and the commands it documents exist."""

from __future__ import annotations

from pathlib import Path

from dalab.benchmarks.methods_table import BLOCKS, readme_blocks, rewrite_readme

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_generated_tables_match_the_registries():
    blocks = readme_blocks(README.read_text())
    assert set(blocks) == set(BLOCKS), "README lacks a generated block; add its markers"
    for name, make in BLOCKS.items():
        assert blocks[name] == make().strip(), (
            f"README's {name} table is stale: run `python -m dalab.benchmarks.methods_table --write`")


def test_rewrite_replaces_only_the_blocks():
    text = "intro\n<!-- generated: methods -->\nold\n<!-- end: methods -->\nmiddle\n" \
           "<!-- generated: shared-hparams -->\n<!-- end: shared-hparams -->\n" \
           "<!-- generated: data-options -->\nx\n<!-- end: data-options -->\n" \
           "<!-- generated: selection-rules -->\n<!-- end: selection-rules -->\noutro\n"
    out = rewrite_readme(text)
    assert out.startswith("intro\n") and "\nmiddle\n" in out and out.endswith("outro\n")
    assert readme_blocks(out) == {n: m().strip() for n, m in BLOCKS.items()}


def test_readme_commands_are_make_targets():
    makefile = (README.parent / "Makefile").read_text()
    for target in ("bench", "test"):
        assert f"\n{target}:" in makefile and f"make {target}" in README.read_text()
