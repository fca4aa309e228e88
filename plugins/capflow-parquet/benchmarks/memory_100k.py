"""Peak memory of ``storage=parquet`` over 100,000 rows (target: at most 150 MB).

Run it where capflow and capflow-parquet are installed::

    python plugins/capflow-parquet/benchmarks/memory_100k.py [--rows 100000]

It writes a Parquet dataset of ``--rows`` rows (1,000 small images, each row its own question,
so every row is a request of its own), serves them from capflow's loopback OpenAI server in
this process, runs the real ``capflow`` command and prints the command's peak resident memory
(the child's ``ru_maxrss``), the time taken and whether every row came back with a caption.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capflow.testing.pytest_plugin import capflow_command
from capflow.testing.server import FakeOpenAIServer

TARGET_MB = 150.0
# Runs the command given as arguments; prints its peak resident memory in MB, last.
MEASURE = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
sys.exit(done.returncode)
"""
N_IMAGES = 1000


def make_dataset(folder: Path, rows: int) -> Path:
    for i in range(N_IMAGES):
        Image.new("RGB", (16 + i % 50, 16 + i // 50), (i % 256, 80, 160)).save(
            folder / f"{i}.png")
    table = pa.table({
        "id": pa.array(range(rows), type=pa.int64()),
        "image": [f"{i % N_IMAGES}.png" for i in range(rows)],
        "source": pa.array([f"crawl-{i % 97}" for i in range(rows)]).dictionary_encode(),
        "width": pa.array([16 + (i % N_IMAGES) % 50 for i in range(rows)], type=pa.int16()),
    })
    path = folder / "data.parquet"
    pq.write_table(table, path, row_group_size=10_000)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIServer() as server:
        folder = Path(tmp)
        make_dataset(folder, args.rows)
        command = [*capflow_command(), "storage=parquet", "input=data.parquet",
                   "output=out.parquet", f"api_url={server.base_url}", "model_name=m",
                   "max_workers=256", "progress=false", "image.prepare=false",
                   "prompt.user='Describe image {id}.'"]
        began = time.perf_counter()
        # Measured from a small launcher: a child forked from this process would count this
        # process's pages (the dataset just written) in its peak until it execs capflow.
        done = subprocess.run([sys.executable, "-c", MEASURE, *command], cwd=folder,
                              capture_output=True, text=True)
        elapsed = time.perf_counter() - began
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
            return 1
        peak_mb = float(done.stdout.strip().splitlines()[-1])
        out = pq.read_table(folder / "out.parquet", columns=["id", "caption"])
        complete = (out.num_rows == args.rows and out.column("caption").null_count == 0
                    and out.column("id").to_pylist() == list(range(args.rows)))
    verdict = "PASS" if peak_mb <= TARGET_MB and complete else "FAIL"
    print(f"storage=parquet, {args.rows:,} rows: peak RSS {peak_mb:.1f} MB"
          f" (target <= {TARGET_MB:.0f} MB), {elapsed:.1f} s, {args.rows / elapsed:,.0f} rows/s,"
          f" every row captioned in order: {complete} -> {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
