"""Embeddings first at the seed's scale: the `sface` recipe on 7,000 identities x 20 images at 112 px.

Generates the synthetic face set (facecls.data.synthetic, drawn faces at 112 px; kept in --workdir so a
second run skips it), then runs ``facecls train --recipe sface`` on it in a child process with a fresh
feature cache, as a user would, and reports from the run's own log and metrics:

  - embedding throughput: training images x views / the seconds the log gives for computing them
  - the head phase: its epochs and the seconds they took (metrics.csv), and the whole run's wall time
  - peak memory against the issue's 4 GiB: the anonymous memory of the run and its loader workers
    (proportional set size, sampled every 0.5 s), and the peak RSS of any one process (ru_maxrss), which
    also counts the mapped decoded-cache pages

    python benchmarks/embeddings_scale.py [--identities 7000 --per-identity 20] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from facecls.data.synthetic import SyntheticSpec, generate_synthetic_faces
from facecls.runtime.machine import cpu_text

FEATURES_LINE = re.compile(r"^(train|val) features: (\d+) images x (\d+) view\(s\) computed in ([\d.]+) s", re.M)


def tree_anon_kib(pid: int) -> int:
    """Anonymous memory (KiB) of ``pid`` and its children, each page divided among the processes sharing
    it (Pss_Anon: a forked loader worker shares its parent's pages until either writes them); without
    the pages of the memory-mapped decoded cache, which count in RSS but are the kernel's page cache."""
    total = 0
    pids = [str(pid)]
    try:
        pids += open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        pass
    for p in pids:
        try:
            rollup = open(f"/proc/{p}/smaps_rollup").read()
        except OSError:
            continue
        found = re.search(r"^Pss_Anon:\s+(\d+)", rollup, re.M)
        total += int(found[1]) if found else 0
    return total


def parse_log(log: str) -> dict:
    """Embedding throughput of each split the log says was computed: {split: (images x views, seconds)}."""
    return {m[1]: (int(m[2]) * int(m[3]), float(m[4])) for m in FEATURES_LINE.finditer(log)}


def head_phase(metrics_csv: Path) -> tuple[int, float]:
    """Epochs of the stored-feature phase and their seconds, from a run's metrics.csv."""
    with open(metrics_csv, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["phase"] == "features"]
    return len(rows), sum(float(r["seconds"]) for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=7000)
    parser.add_argument("--per-identity", type=int, default=20)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--workdir", type=Path, help="keep the generated set and the run here (default: temp)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides")
    parser.add_argument(
        "--cache", type=Path, help="the facecls cache to use (default: a fresh one, so the run embeds everything)"
    )
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="facecls-scale-"))
    spec = SyntheticSpec(
        identities=args.identities, images_per_identity=args.per_identity, test_per_identity=0, size=args.size
    )
    data = work / f"synthetic-{spec.fingerprint()}"
    started = time.perf_counter()
    generate_synthetic_faces(data, spec, progress=True)
    print(f"data: {data} ({time.perf_counter() - started:.0f} s to generate or find)", flush=True)

    run = work / f"run-{int(time.time())}"
    env = {**os.environ, "FACECLS_CACHE": str(args.cache or work / f"cache-{run.name}")}
    command = [sys.executable, "-m", "facecls", "train", "--recipe", "sface", "--data", str(data), "--out", str(run)]
    for override in args.set:
        command += ["--set", override]
    started = time.perf_counter()
    log_file = work / f"{run.name}.log"
    with open(log_file, "w") as out:
        child = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        anon_peak = 0
        while child.poll() is None:  # the anonymous memory of the run and its loader workers, together
            anon_peak = max(anon_peak, tree_anon_kib(child.pid))
            time.sleep(0.5)
    wall = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    log = log_file.read_text()
    if child.returncode != 0:
        print(log[-4000:], file=sys.stderr)
        return child.returncode
    embedded = parse_log(log)
    epochs, head_s = head_phase(run / "metrics.csv")
    images, seconds = embedded["train"]
    final = re.search(r"val top-1 ([\d.]+)%, test top-1 ([\d.]+)%", log)
    print(f"CPU {cpu_text()}; {args.identities} identities x {args.per_identity} images")
    print(
        "| identities x images | embedding img/s (train) | head phase | whole run | peak anonymous memory "
        "(run + workers) | peak RSS (with mapped cache pages) | val / test top-1 |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.identities} x {args.per_identity} at {args.size} px | {images / seconds:.1f} ({images} in "
        f"{seconds:.0f} s) | {epochs} epochs in {head_s:.1f} s | {wall:.0f} s | {anon_peak / 2**20:.2f} GiB | "
        f"{peak_gib:.2f} GiB | {final[1] if final else '?'} / {final[2] if final else '?'} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
