"""Gather fine-tuning / linear-probe results into one table shaped like the paper's Table 1.

Every `clip2scene finetune` / `linear-probe` run writes `result.json`; `gather` reads them (from
run folders, or recursively under given folders), and `format_table` lays them out with one row
per initialisation (random init, then each pre-trained checkpoint) and one column per setting
(linear probe, then label fractions from small to large), cells = mIoU in %.

    rows = gather(["runs/"])
    print(format_table(rows))

CLI: `clip2scene report runs/ [--out table.md]`.
"""

from __future__ import annotations

import json
from pathlib import Path

from clip2scene.errors import ConfigError


def gather(paths: list[str | Path]) -> list[dict]:
    """Load every result.json under `paths` (files or folders, searched recursively)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob("result.json")))
        else:
            raise ConfigError(f"no such run folder or file: {p}")
    if not found:
        raise ConfigError(f"no result.json under {', '.join(map(str, paths))}")
    rows = []
    for f in found:
        try:
            r = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f}: not valid JSON ({e.msg.rstrip(': ')}: line {e.lineno} column {e.colno})") from None
        if "mode" not in r or "label_fraction" not in r:
            raise ConfigError(f"{f}: not a finetune/linear-probe result")
        r["_path"] = str(f)
        rows.append(r)
    return rows


def _column(r: dict, multi: bool) -> tuple[str, int, float, str]:
    """(dataset, kind, fraction, header): linear probes first, then fractions small to large."""
    frac = r["label_fraction"]
    if r["mode"] == "linear":
        kind, label = 0, ("linear probe" if frac >= 1 else f"linear probe {frac * 100:g}%")
    else:
        kind, label = 1, f"{frac * 100:g}%"
    ds = str(r.get("dataset"))
    return (ds, kind, frac, f"{ds} {label}" if multi else label)


def _row(r: dict) -> str:
    return "random init" if r["init"] == "random" else f"pretrained ({r['pretrained']})"


def format_table(rows: list[dict]) -> str:
    """Markdown table: rows = initialisations, columns = (dataset,) setting, cells = mIoU %
    (the run found last wins a duplicate cell)."""
    datasets = sorted({str(r.get("dataset")) for r in rows})
    multi = len(datasets) > 1
    cols = sorted({_column(r, multi) for r in rows})
    names = sorted({_row(r) for r in rows}, key=lambda n: (n != "random init", n))
    cell: dict[tuple[str, str], str] = {}
    for r in rows:
        v = r.get("miou")
        cell[(_row(r), _column(r, multi)[3])] = "n/a" if v is None else f"{100 * v:.1f}"
    splits = sorted({str(r.get("eval_split", "?")) for r in rows})
    lines = [f"mIoU (%) on {', '.join(splits)} ({', '.join(datasets)})", "",
             "| initialisation | " + " | ".join(c[3] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(cell.get((n, c[3]), "") for c in cols) + " |")
    return "\n".join(lines)
