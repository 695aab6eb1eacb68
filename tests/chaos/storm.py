"""The storm: many tasks with misbehaving callbacks, submitted to every replica, and
the checks that nothing was lost, billed twice or stored twice.

Each task's prompt carries simulator directives drawn from a seeded random
generator: duplicated (one after another or at once) terminal callbacks, a late
stale ``processing`` snapshot, or no callback at all (the reconciler must find
the outcome), and sometimes a slow image. On top of that, a shuffler delivers
extra stale and duplicate snapshots of random tasks, in random order, through
the simulator's on-demand callback route.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.callback_urls import WEBHOOK_PATH
from app.variants import VARIANTS
from tests.chaos.cluster import TERMINAL, Cluster, expected_sha256
from tests.e2e.stack import sha256, wait_for

SEED = int(os.environ.get("CHAOS_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
DROP_SHARE = 0.20
SLOW_SHARE = 0.10
# Completed tasks that ask gpt-image-2 for several images (n = 2 or 3).
MULTI_SHARE = 0.15
SUBMITTERS = 8


@dataclass
class Planned:
    """One storm task as the client asked for it."""

    index: int
    prompt: str
    outcome: str
    drop: bool
    deliveries: int  # terminal callbacks the simulator sends (0 when dropped)
    late_processing: bool
    slow: bool
    key: str = ""
    task_id: str | None = None
    answers: list[int] = field(default_factory=list)  # POST /tasks statuses, retries included
    image_size: int | None = None  # the image_size directive, if any
    images: int = 1  # n: how many images the task asks for


def plan(count: int, rng: random.Random, *, slow_share: float = SLOW_SHARE) -> list[Planned]:
    """``count`` tasks with random callback faults and outcomes."""
    tasks = []
    for index in range(count):
        outcome = rng.choices(["completed", "failed", "cancelled"], [85, 10, 5])[0]
        drop = rng.random() < DROP_SHARE
        directives = [f"outcome={outcome}", f"eta={rng.randint(50, 150)}"]
        directives.append(f"body={rng.choice(['published', 'envelope', 'bare'])}")
        directives.append(f"url={rng.choice(['string', 'list'])}")
        deliveries, late = 0, False
        if drop:
            directives.append("drop")
        else:
            dup, concurrent = rng.randint(1, 3), 1
            if dup == 1 and rng.random() < 0.5:
                concurrent = rng.randint(2, 3)
            directives += [f"dup={dup}", f"concurrent_dup={concurrent}"]
            deliveries = dup * concurrent
            late = rng.random() < 0.3
            if late:
                directives.append("late_processing")
        slow = outcome == "completed" and rng.random() < slow_share
        if slow:
            directives.append("image_slow=4")
        prompt = f"storm task {index} [sim:{','.join(directives)}]"
        planned = Planned(index, prompt, outcome, drop, deliveries, late, slow)
        if rng.random() < MULTI_SHARE:
            planned.images = rng.randint(2, 3)
        tasks.append(planned)
    return tasks


async def submit_one(
    cluster: Cluster, task: Planned, replica: int, *, attempts: int = 6
) -> Planned:
    """POST /tasks to one replica, retrying on the others with the same Idempotency-Key."""
    task.key = f"storm-{SEED}-{task.index}"
    body: dict[str, Any] = {"prompt": task.prompt, "metadata": {"storm": task.index}}
    if task.images > 1:
        body.update(model="gpt-image-2", n=task.images, size="1:1")
    headers = {"Idempotency-Key": task.key}
    for attempt in range(attempts):
        client = cluster.clients[(replica + attempt) % len(cluster.clients)]
        try:
            response = await client.post("/tasks", json=body, headers=headers, timeout=30)
        except httpx.TransportError:
            task.answers.append(0)
            await asyncio.sleep(1)
            continue
        task.answers.append(response.status_code)
        if response.status_code == 202:
            task.task_id = response.json()["id"]
            return task
        if response.status_code != 409:  # 409: the first attempt is still in flight
            raise AssertionError(f"POST /tasks answered {response.status_code}: {response.text}")
        await asyncio.sleep(2)
    return task  # still unknown to the client: found by its metadata at the end


async def submit_all(cluster: Cluster, tasks: list[Planned], *, pace: float = 0.0) -> None:
    """Submit every task, alternating replicas, a few at a time."""
    queue: asyncio.Queue[Planned] = asyncio.Queue()
    for task in tasks:
        queue.put_nowait(task)

    async def submitter() -> None:
        while not queue.empty():
            task = queue.get_nowait()
            await submit_one(cluster, task, task.index % len(cluster.replicas))
            if pace:
                await asyncio.sleep(pace)

    await asyncio.gather(*(submitter() for _ in range(SUBMITTERS)))


@dataclass
class Shuffled:
    """What the shuffler delivered."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)


async def shuffle(
    cluster: Cluster, tasks: list[Planned], rng: random.Random, stop: asyncio.Event
) -> Shuffled:
    """Deliver stale and duplicate snapshots of random tasks until told to stop."""
    result = Shuffled()
    while not stop.is_set():
        candidates = [t for t in tasks if t.task_id and not t.drop]
        if not candidates:
            await asyncio.sleep(0.2)
            continue
        task = rng.choice(candidates)
        rows = await cluster.query(
            "SELECT upstream_task_id FROM tasks WHERE id = :id", id=task.task_id
        )
        upstream = rows[0][0] if rows else None
        if upstream is None:
            continue
        provider = await cluster.sim.task(upstream)
        choices: list[dict[str, Any]] = [
            {"status": "pending"},
            {"status": "processing", "progress": rng.randint(0, 99)},
        ]
        if provider["status"] in TERMINAL:
            choices.append({"status": provider["status"]})  # a duplicate of the outcome
        request = rng.choice(choices)
        answer = await cluster.sim.callback(
            upstream, body=rng.choice(["published", "envelope", "bare"]), **request
        )
        result.sent += 1
        for attempt in answer["attempts"]:
            result.statuses[attempt["status_code"] or 0] += 1
        await asyncio.sleep(rng.uniform(0.01, 0.15))
    return result


def latency(samples: list[float]) -> dict[str, float]:
    """p50, p99 and max of some milliseconds (a figure, never asserted)."""
    if not samples:
        return {}
    ordered = sorted(samples)

    def pick(quantile: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(quantile * len(ordered)))], 1)

    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(ordered[-1], 1)}


def storm_index(row: dict[str, Any]) -> int | None:
    """The storm index a task row carries in its metadata."""
    meta = row["metadata"]
    if isinstance(meta, str):
        meta = json.loads(meta)
    index = meta.get("storm") if isinstance(meta, dict) else None
    return index if isinstance(index, int) else None


def caller_task_id(sim_task: dict[str, Any]) -> str | None:
    """Our task id, from the callback URL the provider task was submitted with."""
    url = sim_task["request"].get("callback_url") or ""
    _, found, rest = url.partition(f"{WEBHOOK_PATH}/")
    return rest.split("/")[0] if found else None


def answer_died(sim_task: dict[str, Any], rows: dict[str, dict[str, Any]]) -> bool:
    """A provider task whose submit answer died with a killed replica and that never
    called back: nothing can tell us its id (the query API needs it, and StarMagic
    has no lookup by anything else), so the task of ours it was submitted for ends
    failed with submission_outcome_unknown, still without one. Only a kill (or a
    30 s read timeout) loses the answer, and only a dropped callback leaves no
    other way to learn the id; a callback answered 2xx must have told us."""
    row = rows.get(caller_task_id(sim_task) or "")
    called_back = any(200 <= (a["status_code"] or 0) < 300 for a in sim_task["callback_attempts"])
    return (
        row is not None
        and row["upstream_task_id"] is None
        and row["error_code"] == "submission_outcome_unknown"
        and not called_back
    )


@dataclass
class Verdict:
    """The storm's outcome, task by task and in total."""

    tasks: int
    by_status: Counter[str]
    images_stored: int  # tasks whose every image is stored
    image_objects: int  # images stored, several per task where n > 1
    multi_image_tasks: int  # completed tasks that asked for n > 1
    image_gets: Counter[int]  # GETs per completed task -> how many tasks
    callback_attempts: int
    callback_statuses: Counter[int]
    deliveries_recorded: int
    callback_ms: dict[str, float]  # latency of the 2xx answers the provider got: p50, p99, max
    webhook_ms: dict[str, float]  # the replicas' own time per callback, from their access log
    unknown_submissions: int  # a kill mid-submit: failed (submission_outcome_unknown), not lost
    answers_died: int  # ... of which the provider had the task, which never called back
    dropped: int
    duplicate_deliveries: int
    late_processing: int
    lost: list[str]
    stored_twice: list[str]
    wrong_bytes: list[str]
    problems: list[str]
    callbacks_pending_when_settled: int = 0  # tasks whose callbacks were still being sent
    variant_temps_awaiting_sweep: int = 0  # a killed variant write's file, swept later


async def _deliveries_unlike_attempts(
    cluster: Cluster, rows: dict[str, dict[str, Any]], provider: dict[str, dict[str, Any]]
) -> list[str]:
    """Each task whose recorded deliveries differ from the attempts answered 2xx,
    with what the provider saw and what the replicas logged about it."""
    recorded = Counter(
        task_id for (task_id,) in await cluster.query("SELECT task_id FROM callback_deliveries")
    )
    found = []
    for row in rows.values():
        attempts = provider.get(row["upstream_task_id"] or "", {}).get("callback_attempts", [])
        answered = sum(1 for a in attempts if 200 <= (a["status_code"] or 0) < 300)
        if recorded[row["id"]] == answered:
            continue
        seen = [(a["kind"], a["attempt"], a["status_code"], a["error"]) for a in attempts]
        logged = [
            {k: line.get(k) for k in ("event", "status", "outcome", "request_id", "replica")}
            for line in cluster.service_logs(task_id=row["id"])
        ]
        found.append(
            f"{row['id']}: {recorded[row['id']]} deliveries for {answered} answered 2xx; "
            f"attempts {seen}; logged {logged}"
        )
    return found


async def verify(
    cluster: Cluster,
    tasks: list[Planned],
    *,
    refetch_allowed: set[str] | None = None,
    crashes: bool = False,
) -> Verdict:
    """Check every promise about the storm's tasks; collect problems instead of stopping.

    ``refetch_allowed``: tasks whose download a crash interrupted (a second GET is
    expected). ``crashes``: a replica killed after recording a delivery but before
    answering leaves a recorded delivery whose attempt the provider saw fail.
    """
    refetch_allowed = refetch_allowed or set()
    problems: list[str] = []
    # A settled task's duplicate or retried callbacks may still be on their way, each
    # recorded as a delivery when it lands: the provider's record is read once none can
    # come, or a delivery recorded after that read would count against its attempts.
    pending_when_settled = (await cluster.sim.stats())["callbacks_pending"]

    async def callbacks_sent() -> bool:
        return (await cluster.sim.stats())["callbacks_pending"] == 0

    # 47 s: the longest a provider's delivery lasts (four 10 s attempts, 1, 2 and 4 s apart).
    await wait_for(callbacks_sent, timeout=60, interval=0.2, what="the last callbacks")
    rows = {row["id"]: row for row in await cluster.table("tasks")}
    by_index = {storm_index(row): row for row in rows.values()}
    images_of: dict[str, dict[int, dict[str, Any]]] = {}
    for image_row in await cluster.table("images"):
        images_of.setdefault(image_row["task_id"], {})[image_row["position"]] = image_row
    provider = {task["id"]: task for task in await cluster.sim.tasks()}
    stats = await cluster.sim.stats()

    lost = [str(t.index) for t in tasks if t.index not in by_index]
    if len(rows) != len(tasks):
        problems.append(f"{len(rows)} task rows for {len(tasks)} storm tasks")
    upstream_ids = Counter(row["upstream_task_id"] for row in rows.values())
    billed_twice = [uid for uid, n in upstream_ids.items() if uid and n > 1]
    if billed_twice:
        problems.append(f"provider tasks shared by several of ours: {billed_twice}")
    # Each provider task names the task of ours it was submitted for in its callback URL.
    submitted_for = Counter(caller_task_id(sim_task) for sim_task in provider.values())
    submitted_twice = sorted(t for t, n in submitted_for.items() if t is not None and n > 1)
    if submitted_twice:
        problems.append(f"tasks of ours submitted to the provider twice: {submitted_twice}")
    orphans = sorted(set(provider) - set(upstream_ids))
    answer_lost = [uid for uid in orphans if crashes and answer_died(provider[uid], rows)]
    unknown = [uid for uid in orphans if uid not in answer_lost]
    if unknown:
        problems.append(f"provider tasks no task of ours knows: {unknown}")
    if stats["submits"] != len(provider):
        problems.append(f"{stats['submits']} submits for {len(provider)} provider tasks")

    stored_files = cluster.stored_files()
    names = Counter(path.name for path in stored_files)
    stored_twice = sorted(name for name, n in names.items() if n > 1)
    gets: Counter[int] = Counter()
    wrong: list[str] = []
    for task in tasks:
        row = by_index.get(task.index)
        if row is None:
            continue
        where = f"task {task.index} ({row['id']})"
        if row["status"] not in TERMINAL:
            problems.append(f"{where} is still {row['status']}")
            continue
        upstream = row["upstream_task_id"]
        sim_task = provider.get(upstream) if upstream else None
        if sim_task is None:
            if row["error_code"] != "submission_outcome_unknown":
                problems.append(f"{where} never reached the provider yet is {row['status']}")
            continue
        if row["status"] != sim_task["status"]:
            problems.append(f"{where} is {row['status']}, the provider says {sim_task['status']}")
        if row["status"] != "completed":
            if sim_task["image_gets"]:
                problems.append(f"{where} is {row['status']} but its image was fetched")
            continue
        gets[sim_task["image_gets"]] += 1
        if sim_task["image_gets"] != task.images and row["id"] not in refetch_allowed:
            problems.append(f"{where}: {sim_task['image_gets']} image GETs for {task.images}")
        first = images_of.get(row["id"], {}).get(0, {})
        if row["image_status"] != "stored":
            problems.append(f"{where}: image {row['image_status']} ({first.get('error_code')})")
            continue
        if len(images_of.get(row["id"], {})) != task.images:
            problems.append(f"{where}: {len(images_of.get(row['id'], {}))} images of {task.images}")
            continue
        for position, image in sorted(images_of[row["id"]].items()):
            name = f"{row['id']}.png" if position == 0 else f"{row['id']}-{position}.png"
            expected = await expected_sha256(upstream, task.image_size, position)
            objects = [p for p in stored_files if p.name == name]
            if len(objects) != 1:
                problems.append(f"{where}: {len(objects)} stored objects for image {position}")
                continue
            if not (image["sha256"] == expected == sha256(objects[0].read_bytes())):
                wrong.append(f"{row['id']}/{position}")
            if objects[0].relative_to(cluster.storage_dir).as_posix() != image["key"]:
                problems.append(f"{where}: stored at {objects[0]}, recorded as {image['key']}")
    completed_ids = {row["id"] for row in rows.values() if row["status"] == "completed"}
    strays = sorted(p.name for p in stored_files if p.stem.split("-")[0] not in completed_ids)
    if strays:
        problems.append(f"objects of no completed task: {strays}")
    # The variants of the last images stored may still be rendering, from a spool copy
    # of the original that lives until they are made, and the spool has none of their
    # files for a moment before each is written. Without kills every stored image gets
    # its variants, each stored by renaming its own temp file: once all are there, no
    # file is left to write. A kill mid-render leaves an image without them (nothing
    # renders them again), so with kills only the variant files are waited for.
    stored_images = sum(
        1
        for images in images_of.values()
        for image in images.values()
        if image["status"] == "stored"
    )
    wanted = 0 if crashes else len(VARIANTS) * stored_images
    for _ in range(100):
        leftovers = cluster.spool_leftovers()
        rendering = any(p.name.startswith("variant-") for p in leftovers)
        if not rendering and len(cluster.variant_files()) >= wanted:
            break
        await asyncio.sleep(0.1)
    # A process killed while writing a WebP variant leaves its temp file; nothing re-runs
    # a stored image's variants, so the next variant write sweeps it once it is 30 s old
    # (tests/services/test_variants.py). Only with kills, and never an image's own file.
    awaiting_sweep = [
        p for p in leftovers if crashes and p.name.startswith("variant-") and p.suffix == ".part"
    ]
    unexpected = [p.name for p in leftovers if p not in awaiting_sweep]
    if unexpected:
        problems.append(f"temp files left in the spool: {unexpected}")

    recorded_once = Counter(
        (line["task_id"], line.get("position")) for line in cluster.service_logs("image_stored")
    )
    twice = sorted(task_id for task_id, n in recorded_once.items() if n > 1)
    if twice:
        problems.append(f"image recorded as stored more than once: {twice}")

    # The event log says it: a terminal event is written in the transaction that makes
    # the move, so it exists if and only if the move committed.
    terminal_events = Counter(
        task_id
        for (task_id,) in await cluster.query(
            "SELECT task_id FROM events WHERE type IN (:completed, :failed, :cancelled)",
            **{status: f"task.{status}" for status in TERMINAL},
        )
    )
    for row in rows.values():
        if row["status"] in TERMINAL and terminal_events[row["id"]] != 1:
            problems.append(f"{row['id']} has {terminal_events[row['id']]} terminal events")
    if not crashes:
        # The log lines say it too: each move is told once it has committed, so a kill
        # between the commit and the line leaves none (hence only without crashes).
        transitions = Counter(
            line["task_id"]
            for line in cluster.service_logs()
            if (line.get("event") == "task_transition" and line.get("status") in TERMINAL)
            # A submit's own answer tells its move on its request line (submit_accepted).
            or (line.get("event") == "submit_accepted" and line.get("task_status") in TERMINAL)
            # A callback applied as it came tells its move on its own request line.
            or (line.get("event") == "callback_received" and line.get("task_status") in TERMINAL)
            or line.get("event") == "task_given_up"
        )
        for row in rows.values():
            if row["status"] in TERMINAL and transitions[row["id"]] != 1:
                problems.append(f"{row['id']} became terminal {transitions[row['id']]} times")

    attempts = [a for task in provider.values() for a in task["callback_attempts"]]
    statuses = Counter(a["status_code"] or 0 for a in attempts)
    deliveries = (await cluster.query("SELECT count(*) FROM callback_deliveries"))[0][0]
    accepted = sum(n for code, n in statuses.items() if 200 <= code < 300)
    failed = len(attempts) - accepted
    too_few = deliveries < accepted
    too_many = deliveries > accepted + (failed if crashes else 0)
    if too_few:
        problems.append(f"{accepted} callbacks answered 2xx but {deliveries} deliveries recorded")
    if too_many:
        problems.append(f"{deliveries} deliveries recorded for {accepted} answered 2xx")
    if too_few or too_many:
        problems.extend(await _deliveries_unlike_attempts(cluster, rows, provider))
        problems.extend(
            f"logged: {line}"
            for line in cluster.service_logs()
            if line.get("level") in ("warning", "error", "critical")
        )
    # With every replica up the forwarder never answers itself; when it did, why.
    problems.extend(
        f"the forwarder answered {r.status} to {r.method} {r.path} (replica {r.replica}, "
        f"{r.request_id}): {r.error}; the replica logged "
        f"{cluster.service_logs(request_id=r.request_id)}"
        for r in cluster.proxy.records
        if not r.from_replica and not r.degraded
    )
    dropped = [t for t in tasks if t.drop]
    for task in dropped:
        row = by_index.get(task.index)
        sim_task = provider.get(row["upstream_task_id"]) if row else None
        if sim_task and any(a["kind"] != "manual" for a in sim_task["callback_attempts"]):
            problems.append(f"task {task.index} was to have no callback")
    return Verdict(
        tasks=len(rows),
        by_status=Counter(row["status"] for row in rows.values()),
        images_stored=sum(1 for row in rows.values() if row["image_status"] == "stored"),
        image_objects=len(stored_files),
        multi_image_tasks=sum(
            1
            for task in tasks
            if task.images > 1 and by_index.get(task.index, {}).get("status") == "completed"
        ),
        image_gets=gets,
        callback_attempts=len(attempts),
        callback_statuses=statuses,
        deliveries_recorded=deliveries,
        callback_ms=latency([a["latency_ms"] for a in attempts if a["status_code"] == 200]),
        webhook_ms=latency(
            [
                float(line["duration_ms"])
                for line in cluster.service_logs()
                if line.get("event") in ("request", "callback_received")
                and str(line.get("path", "")).startswith("/webhooks/")
            ]
        ),
        unknown_submissions=sum(
            1 for row in rows.values() if row["error_code"] == "submission_outcome_unknown"
        ),
        answers_died=len(answer_lost),
        dropped=len(dropped),
        duplicate_deliveries=sum(max(0, t.deliveries - 1) for t in tasks),
        late_processing=sum(1 for t in tasks if t.late_processing),
        lost=lost,
        stored_twice=stored_twice,
        wrong_bytes=wrong,
        problems=problems,
        callbacks_pending_when_settled=pending_when_settled,
        variant_temps_awaiting_sweep=len(awaiting_sweep),
    )


class Clock:
    """Seconds since the storm began."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self) -> float:
        return round(time.monotonic() - self.started, 1)


class ChaosMonkey:
    """Kills replicas at chosen moments during a storm and starts them again."""

    def __init__(self, cluster: Cluster, tasks: list[Planned], rng: random.Random) -> None:
        self.cluster = cluster
        self.tasks = tasks
        self.rng = rng
        self.clock = Clock()
        self.timeline: list[str] = []
        self._submits: list[asyncio.Task[Planned]] = []

    async def run(self, moments: list[str]) -> None:
        """Kill once per moment, one replica at a time, each started again after a pause."""
        for number, moment in enumerate(moments):
            await asyncio.sleep(self.rng.uniform(1.0, 3.0))
            replica = number % len(self.cluster.replicas)
            await getattr(self, f"_{moment.replace('-', '_')}")(replica)
            await asyncio.sleep(self.rng.uniform(1.0, 3.0))
            await self.cluster.restart(replica)
            self.timeline.append(f"{self.clock()} s: replica {replica} ready again")
        await asyncio.gather(*self._submits)

    async def _kill(self, replica: int, moment: str) -> None:
        kill = await self.cluster.kill(replica, moment)
        interrupted = len(kill.interrupted_downloads)
        self.timeline.append(
            f"{self.clock()} s: killed replica {replica} {moment} "
            f"({interrupted} download leases held)"
        )

    async def _mid_submit(self, replica: int) -> None:
        """Kill while the provider holds our submit call (it answers 3 s late)."""
        index = len(self.tasks)
        prompt = f"storm task {index} [sim:submit_delay=3,eta=100]"
        task = Planned(index, prompt, "completed", False, 1, False, False)
        self.tasks.append(task)
        self._submits.append(asyncio.create_task(submit_one(self.cluster, task, replica)))

        async def at_provider() -> bool:
            provider = await self.cluster.sim.tasks()
            return any(t["request"]["prompt"] == prompt for t in provider)

        await wait_for(at_provider, timeout=30, interval=0.1, what="the slow submit")
        await self._kill(replica, "mid-submit")

    async def _mid_download(self, replica: int) -> None:
        """Kill while the replica streams a slow image into its spool file.

        The storm's own slow images usually provide one; if none lands on this
        replica for a while, one more slow task is added, until one does.
        """
        pid = self.cluster.replicas[replica].pid

        async def downloading() -> bool:
            rows = await self.cluster.query(
                "SELECT task_id FROM images WHERE status = 'pending' AND lease_owner LIKE :owner",
                owner=f"%:{pid}:%",
            )
            spooled = {p.name.split("-")[0] for p in self.cluster.spool_leftovers()}
            return any(row[0] in spooled for row in rows)

        for _ in range(12):
            try:
                await wait_for(downloading, timeout=10, interval=0.1, what="a download")
                break
            except AssertionError:
                index = len(self.tasks)
                prompt = f"storm task {index} [sim:image_slow=6,eta=50]"
                extra = Planned(index, prompt, "completed", False, 1, False, True)
                self.tasks.append(extra)
                self._submits.append(asyncio.create_task(submit_one(self.cluster, extra, replica)))
        else:
            raise AssertionError(f"no download ever ran on replica {replica}")
        await self._kill(replica, "mid-download")

    async def _mid_callback(self, replica: int) -> None:
        """Kill while the forwarder waits for the replica's answer to a callback."""

        async def busy() -> bool:
            return self.cluster.proxy.inflight_callbacks[replica] > 0

        try:
            await wait_for(busy, timeout=30, interval=0.005, what="a callback in flight")
            await self._kill(replica, "mid-callback")
        except AssertionError:
            await self._kill(replica, "random")

    async def _random(self, replica: int) -> None:
        """Kill whatever the replica is doing."""
        await self._kill(replica, "random")
