"""``make bench-peers``: PIMMI 0.4.0 and memetrace side by side on the same images, in one run.

    .venv/bin/python -m benchmarks.peers [--split dev] [--cache DIR] [--out DIR] [--only memetrace|pimmi]

1. Generates (or reuses) the split exactly as ``make bench`` does (``benchmarks.run.generate``).
2. PIMMI 0.4.0 from PyPI in its own Python 3.10 virtualenv (``<cache>/pimmi-venv``, made once, its
   versions pinned below), run with its Copydays settings: ``fill`` (``--sift-nfeatures 1000
   --index-type IVF1024,Flat``), ``query`` (``--query-sift-knn 1000 --query-dist-ratio-threshold
   0.8``), ``clusters`` (``--algo components``), each with ``--nb-threads`` = the usable CPUs.
3. memetrace's whole commands on the same folder and a fresh data dir: ``memetrace index`` then
   ``memetrace export`` (the clusters CSV).
4. Both clusters CSVs scored by the benchmark's ``score.py``; prints wall seconds and images/s of
   each system (start-up included: whole commands), the ratio, the quality figures and the CPU flags.

The ratio is the figure that counts: both run on the same machine within minutes of each other,
while absolute times vary with what else the machine runs. Writes ``<out>/peers.json``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.run import (DEFAULT_CACHE, DEFAULT_OUT, BenchError, _cpu_model, _table, bench_dir,
                            generate, score, split_dir)

PIMMI_PINS = ("pimmi==0.4.0", "numpy==2.2.6", "faiss-cpu==1.15.1", "opencv-python==5.0.0.93",
              "requests==2.34.2")  # pimmi's CLI imports requests without declaring it
PIMMI_INDEX = ("--index-type", "IVF1024,Flat")
PIMMI_FILL = ("--sift-nfeatures", "1000", *PIMMI_INDEX)
PIMMI_QUERY = ("--query-sift-knn", "1000", "--query-dist-ratio-threshold", "0.8", *PIMMI_INDEX)
PIMMI_CLUSTERS = (*PIMMI_INDEX, "--algo", "components")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """The SIMD flags speed depends on (bf16 autocast, OpenCV, FAISS), as /proc/cpuinfo lists them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return [f for f in CPU_FLAGS if f in flags]


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- PIMMI's virtualenv


def find_python310() -> Path:
    """A Python 3.10 interpreter (PIMMI 0.4.0's): on PATH, else among pyenv's versions."""
    found = shutil.which("python3.10")
    if found and _runs(found):
        return Path(found)
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for cand in sorted(glob.glob(str(root / "versions" / "3.10*" / "bin" / "python3.10")), reverse=True):
        if _runs(cand):
            return Path(cand)
    raise BenchError("PIMMI 0.4.0 needs Python 3.10: none on PATH nor in pyenv "
                     "(install one: `pyenv install 3.10` or `apt-get install python3.10-venv`)")


def _runs(python: str) -> bool:
    return subprocess.run([python, "-c", "import venv"], capture_output=True).returncode == 0


def pimmi_venv(cache: Path) -> Path:
    """``<cache>/pimmi-venv`` with PIMMI_PINS installed (once: a stamp records the pins); its pimmi."""
    venv = cache / "pimmi-venv"
    stamp = venv / ".memetrace-pins"
    pimmi = venv / "bin" / "pimmi"
    if stamp.is_file() and stamp.read_text() == "\n".join(PIMMI_PINS) and pimmi.is_file():
        return pimmi
    if venv.exists():
        shutil.rmtree(venv)
    _check([str(find_python310()), "-m", "venv", str(venv)], "creating PIMMI's virtualenv")
    _check([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", *PIMMI_PINS],
           "pip install " + " ".join(PIMMI_PINS))
    stamp.write_text("\n".join(PIMMI_PINS))
    return pimmi


def _check(cmd: list[str], what: str, cwd: Path | None = None) -> float:
    """Runs ``cmd``; its wall seconds, or BenchError with the end of its stderr."""
    return _run(cmd, what, cwd)[0]


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> tuple[float, str]:
    """Runs ``cmd``; its wall seconds and stdout, or BenchError with the end of its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise BenchError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout


# ---------------------------------------------------------------- the two systems


def run_pimmi(pimmi: Path, images: Path, work: Path) -> dict[str, Any]:
    """fill -> query -> clusters with the Copydays settings; the clusters CSV in score.py's form."""
    if work.exists():
        shutil.rmtree(work)
    index = work / "index"
    index.parent.mkdir(parents=True)
    threads = ("--nb-threads", str(usable_cpus()))
    mining, raw = work / "mining.csv", work / "pimmi_clusters.csv"
    steps = {
        "fill": [str(pimmi), *threads, *PIMMI_FILL, "fill", "--erase", "--force", str(images), str(index)],
        "query": [str(pimmi), *threads, *PIMMI_QUERY, "query", str(images), str(index), "-o", str(mining)],
        "clusters": [str(pimmi), *PIMMI_CLUSTERS, "clusters", str(index), str(mining), "-o", str(raw)],
    }
    seconds = {name: round(_check(cmd, f"pimmi {name}", cwd=work), 2) for name, cmd in steps.items()}
    clusters = work / "clusters.csv"
    with raw.open(newline="") as src, clusters.open("w", newline="") as dst:
        out = csv.writer(dst)
        out.writerow(["path", "cluster_id"])
        out.writerows([Path(r["path"]).name, r["cluster_id"]] for r in csv.DictReader(src))
    return {"seconds": round(sum(seconds.values()), 2), "steps_s": seconds, "clusters_csv": str(clusters)}


def run_memetrace(images: Path, work: Path) -> dict[str, Any]:
    """``memetrace index`` then ``memetrace export`` on a fresh data dir, as a user runs them."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    exe = str(Path(sys.executable).with_name("memetrace"))
    base = [exe, "--data-dir", str(work / "data")]
    clusters = work / "clusters.csv"
    index_s, summary = _run([*base, "index", str(images)], "memetrace index")
    seconds = {"index": round(index_s, 2),
               "export": round(_check([*base, "export", "--out", str(clusters)], "memetrace export"), 2)}
    stages = {k: v for k, v in json.loads(summary).items() if k.endswith("_s")}  # inside `index`
    return {"seconds": round(sum(seconds.values()), 2), "steps_s": seconds, "index_stages_s": stages,
            "clusters_csv": str(clusters)}


# ---------------------------------------------------------------- the figure

QUALITY_KEYS = ("cluster_f1", "cluster_precision", "cluster_recall", "query_average_precision")


def run_peers(split: str, cache: Path, out: Path, only: str | None = None) -> dict[str, Any]:
    bench = bench_dir()
    src = split_dir(bench, split)
    gt, _ = generate(bench, src, cache / "generated" / (split if split == "dev" else src.name))
    images = gt.parent / "images"
    n = sum(1 for f in images.iterdir() if f.is_file())
    out.mkdir(parents=True, exist_ok=True)
    systems: dict[str, dict[str, Any]] = {}
    if only in (None, "pimmi"):
        systems["PIMMI 0.4.0"] = run_pimmi(pimmi_venv(cache), images, out / "pimmi")
    if only in (None, "memetrace"):
        systems["memetrace"] = run_memetrace(images, out / "memetrace")
    for r in systems.values():
        r["images_per_s"] = round(n / r["seconds"], 2)
        r["score"] = score(bench, gt, Path(r["clusters_csv"]))
    result: dict[str, Any] = {
        "split": split, "images": n, "ground_truth": str(gt),
        "machine": {"cpu_model": _cpu_model(), "usable_cpus": usable_cpus(), "cpu_flags": cpu_flags()},
        "systems": systems,
    }
    if len(systems) == 2:
        result["ratio"] = round(systems["memetrace"]["images_per_s"] / systems["PIMMI 0.4.0"]["images_per_s"], 2)
    (out / "peers.json").write_text(json.dumps(result, indent=2))
    return result


def _steps(s: dict[str, Any]) -> str:
    text = ", ".join(f"{k} {v:.1f}" for k, v in s["steps_s"].items())
    inner = s.get("index_stages_s")
    return text + (" (" + ", ".join(f"{k[:-2]} {v:.1f}" for k, v in inner.items()) + ")" if inner else "")


def format_peers(r: dict[str, Any]) -> str:
    m = r["machine"]
    rows = [[name, f"{s['seconds']:.1f}", f"{s['images_per_s']:.2f}",
             *(f"{s['score'][k]:.4f}" for k in QUALITY_KEYS),
             _steps(s)] for name, s in r["systems"].items()]
    parts = [f"side by side on split {r['split']} ({r['images']} images), "
             f"{m['cpu_model']}, {m['usable_cpus']} CPUs, flags: {' '.join(m['cpu_flags']) or 'none of ' + ' '.join(CPU_FLAGS)}",
             "", _table(["system", "seconds", "images/s", *QUALITY_KEYS, "steps (s)"], rows, left=("steps (s)",))]
    if "ratio" in r:
        parts += ["", f"memetrace / PIMMI images/s: {r['ratio']:.2f}x"]
    families = {name: s["score"]["copy_with_original_rate_per_transform"] for name, s in r["systems"].items()}
    names = list(families)
    fams = sorted({f for rates in families.values() for f in rates})
    parts += ["", _table(["transform family", *names], [[f, *(f"{families[s].get(f, 0.0):.3f}" for s in names)]
                                                         for f in fams])]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="dev", help="dev (the benchmark folder) or a split folder (default dev)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                    help=f"generated splits and PIMMI's virtualenv (default {DEFAULT_CACHE})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT / "peers", help="results folder")
    ap.add_argument("--only", choices=("memetrace", "pimmi"), default=None,
                    help="run one system (no ratio): for iterating, the figure is the side-by-side run")
    a = ap.parse_args(argv)
    try:
        result = run_peers(a.split, a.cache.resolve(), a.out.resolve(), a.only)
    except BenchError as exc:
        print(f"bench-peers: {exc}", file=sys.stderr)
        return 2
    print(format_peers(result))
    print(f"\nresults: {a.out.resolve() / 'peers.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
