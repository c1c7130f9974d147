"""One table and one plot from several runs of ``bench_decode_gpu.py`` (issue 10's measurements were made in
several calls on lent machines: no call had the time for every point and variant).

    python benchmarks/merge_decode_gpu.py benchmarks/results/decode_gpu_NVIDIA_H200.json \
        benchmarks/results/decode_gpu_NVIDIA_H200_compiled-batch.json ... \
        --out benchmarks/results/decode_gpu_NVIDIA_H200_merged.json

Files are read in the order given; a later file's row for a variant and point replaces an earlier one's,
and every merged row names its ``source`` (the table and the plot show these rows). Timings from different
processes (and hosts: eager B=1 decode is host-bound and varies between machines by up to 1.5x) are not
comparable, so a hybrid/Qwen3 ratio comes from the last file that measured both, and the verdicts are
``bench_decode_gpu``'s own, per file. The PNG (tokens/s against context, B=1 and B=64 panels) goes next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os

from bench_decode_gpu import POINTS, VARIANTS, plot, verdicts, write_json

# hybrid variant -> its Qwen3 baseline
PAIRS = {"hybrid_eager": "qwen3_eager", "hybrid_compiled": "qwen3_compiled"}
POINT_ORDER = {p: i for i, p in enumerate(POINTS)}  # points outside bench_decode_gpu's table go last


def merge(paths: list[str]) -> dict:
    rows: dict[tuple[str, str], dict] = {}
    every: list[dict] = []  # each file's rows, for the pairs measured in one process
    devices, versions = set(), {}
    for path in paths:
        with open(path) as f:
            record = json.load(f)
        devices.add(record["device"])
        versions[os.path.basename(path)] = record.get("versions")
        for row in record["results"]:
            if row["status"] == "ok":
                row = {**row, "source": os.path.basename(path)}
                rows[(row["variant"], row["point"])] = row
                every.append(row)
    if len(devices) != 1:
        raise SystemExit(f"the files come from different devices: {sorted(devices)}")
    results = sorted(
        rows.values(),
        key=lambda r: (POINT_ORDER.get(r["point"], len(POINT_ORDER)), list(VARIANTS).index(r["variant"])),
    )
    # each file's verdicts over all of its own rows, also those a later file replaced in `results`
    same_file = {}
    for source in dict.fromkeys(r["source"] for r in every):
        mine = [r for r in every if r["source"] == source]
        points = sorted({r["point"] for r in mine}, key=lambda p: POINT_ORDER.get(p, len(POINT_ORDER)))
        same_file[source] = verdicts(mine, points)
    return {
        "benchmark": "decode_gpu_merged",
        "device": devices.pop(),
        "sources": [os.path.basename(p) for p in paths],
        "versions": versions,
        "results": results,
        "pairs_in_one_process": ratios(every),
        "verdicts_per_source": same_file,
    }


def ratios(every: list[dict]) -> list[dict]:
    """Hybrid against Qwen3 per point and mode, from the last file that measured both (rows in file order)."""
    latest = {}
    for r in every:
        base = PAIRS.get(r["variant"])
        b = next(
            (
                x
                for x in every
                if x["source"] == r["source"] and x["variant"] == base and x["point"] == r["point"]
            ),
            None,
        )
        if b is not None:
            latest[(r["point"], r["variant"])] = {
                "point": r["point"],
                "variant": r["variant"],
                "hybrid_ms": r["decode_ms_per_step"],
                "qwen3_ms": b["decode_ms_per_step"],
                "ms_ratio": r["decode_ms_per_step"] / b["decode_ms_per_step"],
                "tokens_per_s_ratio": r["tokens_per_s"] / b["tokens_per_s"],
                "source": r["source"],
            }
    return sorted(
        latest.values(), key=lambda x: (POINT_ORDER.get(x["point"], len(POINT_ORDER)), x["variant"])
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="bench_decode_gpu.py JSON files, oldest first")
    ap.add_argument("--out", required=True, help="merged JSON; the PNG goes next to it")
    args = ap.parse_args()
    record = merge(args.files)
    record["plot"] = plot(record, os.path.splitext(args.out)[0] + ".png")
    write_json(record, args.out)
    print(f"device: {record['device']}")
    print(f"{'variant':<16} {'point':<6} {'ms/step':>8} {'tok/s':>9} {'cache GB':>8} {'recomp':>6}  source")
    for r in record["results"]:
        print(
            f"{r['variant']:<16} {r['point']:<6} {r['decode_ms_per_step']:>8.2f} {r['tokens_per_s']:>9.1f} "
            f"{(r['cache_bytes'] or 0) / 1e9:>8.3f} {r['recompiles_after_warmup']:>6}  {r['source']}"
        )
    print("\nhybrid / Qwen3, each pair from one process (the last file that measured both):")
    for x in record["pairs_in_one_process"]:
        print(
            f"  {x['point']:<6} {x['variant']:<16} {x['hybrid_ms']:7.2f} / {x['qwen3_ms']:7.2f} ms = "
            f"{x['ms_ratio']:.2f}x  tokens/s {x['tokens_per_s_ratio']:.2f}x  ({x['source']})"
        )
    print(f"\nplot: {record['plot']}\nwrote {args.out}")


if __name__ == "__main__":
    main()
