"""Iteration-level scheduling (serving/scheduler.py) over steppers (runtime/stepper.py): every answer equals
its solo run whatever joined or left, easy requests leave early, anytime stops, bounded queue."""
import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from conftest import tiny_model

from crbp_deploy.errors import InputError, Overloaded, RequestError
from crbp_deploy.runtime.stepper import TorchStepper, load_stepper
from crbp_deploy.serving.scheduler import Scheduler


@pytest.fixture(scope="module")
def pathfinder():
    """Tiny pathfinder: per-image iteration counts differ (14-59 at tol 1e-3)."""
    torch.set_num_threads(1)
    return tiny_model("hgru-pathfinder")


@pytest.fixture(scope="module")
def panoptic():
    torch.set_num_threads(1)
    return tiny_model("hgru-panoptic")


def images(n, size=(24, 24), channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((*size, channels), dtype=np.float32) for _ in range(n)]


@torch.no_grad()
def solo(model, image, **budget):
    """The reference: the model's own run on this image alone (padded to the stride, cropped back)."""
    h, w = image.shape[:2]
    s = int(getattr(model, "stride", 1) or 1)
    x = torch.from_numpy(np.pad(image, ((0, -h % s), (0, -w % s), (0, 0)), mode="edge")).permute(2, 0, 1)[None]
    out = model.run(x.contiguous(), **budget)
    return {k: v[..., :h, :w].numpy() for k, v in out.items() if v.dim() == 4}, int(out["iterations"][0])


def assert_solo(model, outcome, image, budget):
    heads, iterations = solo(model, image, **budget)
    assert outcome.iterations == iterations
    for name, value in heads.items():
        np.testing.assert_allclose(outcome.heads[name], value, rtol=0, atol=1e-5)


BUDGETS = [{"max_iters": 60, "tol": 1e-3}, {"max_iters": 60, "tol": 1e-2}, {"iters": 5}, {"max_iters": 9, "tol": 1e-3},
           {"max_iters": 60, "tol": 3e-3}]


@pytest.mark.parametrize("mode, priority", [("iteration", "fewest-steps"), ("iteration", "all"), ("request", "all")])
def test_answers_equal_solo_whatever_joins_or_leaves(pathfinder, mode, priority):
    """Requests with different budgets join mid-run, share steps and leave at different ticks."""
    scheduler = Scheduler(TorchStepper(pathfinder), slots=3, mode=mode, priority=priority)
    imgs = images(7)
    budgets = [BUDGETS[i % len(BUDGETS)] for i in range(7)]
    tickets = [scheduler.submit(imgs[i], budgets[i]) for i in range(4)]
    for _ in range(7):
        scheduler.tick()
    tickets += [scheduler.submit(imgs[i], budgets[i]) for i in range(4, 7)]
    outcomes = scheduler.run_all(tickets)
    for image, budget, outcome in zip(imgs, budgets, outcomes):
        assert_solo(pathfinder, outcome, image, budget)
        assert outcome.stopped in ("converged", "cap", "fixed")
    assert {o.stopped for o in outcomes} >= {"converged", "fixed"}


@pytest.mark.parametrize("policy, rules", [
    ("stable", [(0.0, 1), (0.0, 3), (0.05, 2), (0.01, 1)]),
    ("learned", [(0.3, 1), (0.5, 2), (0.6, 1), (0.9, 3)]),
])
def test_halting_policy_per_row(panoptic, policy, rules):
    """Different thresholds and patience of one policy share a step; each stops as it would alone."""
    from crbp_deploy.models.halting import HaltingHead, feature_count

    torch.manual_seed(0)
    panoptic.halting_head = HaltingHead(feature_count(panoptic.config.channels)).eval()  # untrained: any head
    try:
        scheduler = Scheduler(TorchStepper(panoptic), slots=4)
        imgs = images(4, (16, 20), 3, seed=1)
        budgets = [{"max_iters": 30, "tol": 1e-3, "policy": policy, "threshold": t, "patience": p} for t, p in rules]
        outcomes = scheduler.run_all([scheduler.submit(i, b) for i, b in zip(imgs, budgets)])
        for image, budget, outcome in zip(imgs, budgets, outcomes):
            assert_solo(panoptic, outcome, image, budget)
        assert "policy" in {o.stopped for o in outcomes} and len({o.iterations for o in outcomes}) > 1
    finally:
        del panoptic.halting_head


def _first_done(scheduler, hard, easy):
    """Ticks until the first of two tickets is answered; which one, and whether the other is done too."""
    while not (hard.done() or easy.done()):
        assert scheduler.tick()
    return easy.done(), hard.done()


def test_easy_leaves_before_hard_only_in_iteration_mode(pathfinder):
    image = images(1)[0]
    for mode, expected in [("iteration", (True, False)), ("request", (True, True))]:
        scheduler = Scheduler(TorchStepper(pathfinder), slots=2, mode=mode)
        hard = scheduler.submit(image, {"iters": 30})
        easy = scheduler.submit(image, {"iters": 2})
        assert _first_done(scheduler, hard, easy) == expected, mode
        assert easy.result().iterations == 2 and scheduler.run_all([hard])[0].iterations == 30


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("priority, late_alone", [("fewest-steps", 5), ("all", 0)])
def test_priority_fewest_steps_lets_a_newcomer_catch_up(pathfinder, priority, late_alone):
    """fewest-steps: a request that joins 5 steps late runs alone until it has caught up (least attained
    service); all: it shares every step at once. Same total row-steps either way."""
    scheduler = Scheduler(TorchStepper(pathfinder), slots=2, priority=priority)
    early_image, late_image = images(2, seed=3)
    budget = {"iters": 12}
    early = scheduler.submit(early_image, budget)
    for _ in range(5):
        scheduler.tick()
    late = scheduler.submit(late_image, budget)
    rows = []
    while not (early.done() and late.done()):
        before = scheduler.row_steps
        scheduler.tick()
        rows.append(scheduler.row_steps - before)
    assert rows[:late_alone] == [1] * late_alone and rows[late_alone] == 2
    assert scheduler.row_steps == 24
    assert early.result().iterations == late.result().iterations == 12


def test_deadline_returns_the_current_answer(pathfinder):
    clock = FakeClock()
    scheduler = Scheduler(TorchStepper(pathfinder), slots=2, clock=clock)
    image = images(1)[0]
    ticket = scheduler.submit(image, {"max_iters": 60, "tol": 0.0}, deadline=5.0)
    other = scheduler.submit(image, {"iters": 10})
    for _ in range(3):
        scheduler.tick()
    assert not ticket.done()
    clock.now = 5.0
    scheduler.tick()
    outcome = ticket.result(0)
    assert outcome.stopped == "deadline" and outcome.iterations == 3
    assert_solo(pathfinder, outcome, image, {"iters": 3})
    assert scheduler.run_all([other])[0].iterations == 10  # the others run on


def test_deadline_is_kept_in_request_mode_too(pathfinder):
    clock = FakeClock()
    scheduler = Scheduler(TorchStepper(pathfinder), slots=2, mode="request", clock=clock)
    hard = scheduler.submit(images(1)[0], {"iters": 30})
    urgent = scheduler.submit(images(1)[0], {"iters": 30}, deadline=1.0)
    scheduler.tick()
    clock.now = 1.0
    scheduler.tick()
    assert (urgent.result(0).stopped, urgent.result(0).iterations) == ("deadline", 1) and not hard.done()
    assert scheduler.run_all([hard])[0].iterations == 30


def test_deadline_passed_in_the_queue_is_refused_then(pathfinder):
    """A request that never got a slot has no state to answer from: 503 at its deadline, not later."""
    clock = FakeClock()
    scheduler = Scheduler(TorchStepper(pathfinder), slots=1, clock=clock)
    first = scheduler.submit(images(1)[0], {"iters": 40})
    late = scheduler.submit(images(1)[0], deadline=1.0)
    scheduler.tick()
    clock.now = 1.0
    scheduler.tick()
    assert late.done() and not first.done()
    first_out, late_out = scheduler.run_all([first, late])  # an error is returned in its place, not raised
    assert isinstance(late_out, Overloaded) and late_out.status == 503
    assert "no slot was free before this request's deadline" in str(late_out)
    assert first_out.iterations == 40


def test_cost_cap_stops_with_the_current_answer(pathfinder):
    scheduler = Scheduler(TorchStepper(pathfinder), slots=2)
    image = images(1, (20, 30))[0]
    ticket = scheduler.submit(image, {"max_iters": 60, "tol": 0.0}, max_cost=20 * 30 * 3.5)
    exact = scheduler.submit(image, {"iters": 4}, max_cost=20 * 30 * 4)  # enough for its fixed count
    outcome, fixed = scheduler.run_all([ticket, exact])
    assert (outcome.stopped, outcome.iterations) == ("budget", 3)
    assert_solo(pathfinder, outcome, image, {"iters": 3})
    assert (fixed.stopped, fixed.iterations) == ("fixed", 4)


def test_impossible_cost_is_413(pathfinder):
    scheduler = Scheduler(TorchStepper(pathfinder))
    with pytest.raises(RequestError, match="below one step.*600 pixel-iterations") as info:
        scheduler.submit(images(1, (20, 30))[0], max_cost=599)
    assert info.value.status == 413
    assert scheduler.pending() == 0


def test_full_queue_is_503_not_dropped(pathfinder):
    scheduler = Scheduler(TorchStepper(pathfinder), slots=1, max_queue=2)
    tickets = [scheduler.submit(image, {"iters": 2}) for image in images(2)]
    with pytest.raises(Overloaded, match="queue is full") as info:
        scheduler.submit(images(1)[0])
    assert info.value.status == 503 and info.value.retry_after_s > 0
    load = scheduler.snapshot()
    assert (load["waiting"], load["running"], load["waiting_pixels"]) == (2, 0, 2 * 24 * 24)
    assert [o.iterations for o in scheduler.run_all(tickets)] == [2, 2]


def test_sizes_never_share_a_step(panoptic):
    stepper = TorchStepper(panoptic)
    shapes = []
    advance = stepper.advance
    stepper.advance = lambda states: (shapes.append([tuple(s.h.shape) for s in states]), advance(states))
    scheduler = Scheduler(stepper, slots=4)
    sizes = [(16, 16), (20, 24), (16, 16), (21, 23)]  # 21x23 pads to 22x24: its own lane
    imgs = [images(1, size, 3, seed=i)[0] for i, size in enumerate(sizes)]
    outcomes = scheduler.run_all([scheduler.submit(image, {"iters": 6}) for image in imgs])
    assert all(len(set(batch)) == 1 for batch in shapes)  # one size per step
    assert len({batch[0] for batch in shapes}) == 3 and len(shapes) == 3 * 6  # three lanes, six steps each
    assert sorted(len(batch) for batch in shapes) == [1] * 12 + [2] * 6  # the two 16x16 share theirs
    assert scheduler.snapshot()["steps"] == 18 and scheduler.snapshot()["rows_per_step"] == 24 / 18
    for image, outcome in zip(imgs, outcomes):
        assert outcome.heads["semantic"].shape[-2:] == image.shape[:2]  # cropped back from the padding
        assert_solo(panoptic, outcome, image, {"iters": 6})


@pytest.mark.parametrize("budget, match", [
    ({"max_iters": 0, "tol": 1e-3}, "max_iters=0"),
    ({"tol": -1.0}, "tol must be"),
    ({"policy": "nope", "threshold": 0.1}, "unknown halting policy"),
    ({"bogus": 1}, "unknown budget key"),
    ({"iters": 3, "tol": 1e-3}, "not both"),
    ({"policy": "learned", "threshold": 0.5}, "no halting head"),
])
def test_bad_budgets_refused(panoptic, budget, match):
    scheduler = Scheduler(TorchStepper(panoptic))
    image = images(1, (16, 16), 3)[0]
    with pytest.raises(InputError, match=match):
        scheduler.submit(image, budget)  # refused up front, not in a tick
    assert scheduler.pending() == 0


@pytest.mark.parametrize("image, match", [
    (np.zeros((8, 8, 3), np.uint8), "floating point"),
    (np.zeros((8, 8), np.float32), "H x W x 3"),
    (np.full((8, 8, 3), 2.0, np.float32), r"in \[0, 1\]"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
])
def test_bad_images_refused(panoptic, image, match):
    with pytest.raises(InputError, match=match):
        Scheduler(TorchStepper(panoptic)).submit(image)


def test_bad_options_refused(panoptic):
    stepper = TorchStepper(panoptic)
    with pytest.raises(InputError, match="mode must be"):
        Scheduler(stepper, mode="batch")
    with pytest.raises(InputError, match="slots must be"):
        Scheduler(stepper, slots=0)
    with pytest.raises(InputError, match="deadline must be"):
        Scheduler(stepper).submit(images(1, (8, 8), 3)[0], deadline=float("nan"))
    with pytest.raises(InputError, match="unknown stepper backend"):
        load_stepper(panoptic, backend="tensorrt")


def test_background_loop_threads_and_asyncio(pathfinder):
    """Submit from many threads while the loop ticks; `await ticket`; no ticking while idle."""
    imgs = images(6)
    with Scheduler(TorchStepper(pathfinder), slots=3) as scheduler:
        tickets = [None] * 6

        def send(i):
            tickets[i] = scheduler.submit(imgs[i], {"max_iters": 20, "tol": 1e-2})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outcomes = [t.result(timeout=30) for t in tickets]

        async def waited():
            return await scheduler.submit(imgs[0], {"iters": 3})

        assert asyncio.run(waited()).iterations == 3
        slow = scheduler.submit(imgs[1], {"iters": 10_000})

        async def impatient():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(slow, timeout=0.05)  # the awaiting task is cancelled: so is the ticket

        asyncio.run(impatient())
        assert slow.future.cancelled()
        deadline = time.monotonic() + 10
        while scheduler.pending() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert scheduler.pending() == 0  # its slot is free again
        ticks = scheduler.ticks
        time.sleep(0.05)
        assert scheduler.ticks == ticks  # asleep when idle
    for image, outcome in zip(imgs, outcomes):
        assert_solo(pathfinder, outcome, image, {"max_iters": 20, "tol": 1e-2})



def test_a_failing_step_fails_its_requests_not_the_loop(pathfinder):
    """A model error reaches the tickets in that step as one error; the loop goes on serving."""
    from crbp_deploy.errors import CrbpError

    stepper = TorchStepper(pathfinder)
    advance, calls = stepper.advance, []

    def flaky(states):
        calls.append(len(states))
        if len(calls) == 1:
            raise RuntimeError("boom")
        advance(states)

    stepper.advance = flaky
    scheduler = Scheduler(stepper, slots=2)
    broken = [scheduler.submit(image, {"iters": 5}) for image in images(2)]  # both in the first step
    with scheduler:
        for ticket in broken:
            with pytest.raises(CrbpError, match="model failed on this request: RuntimeError: boom"):
                ticket.result(timeout=30)
        assert scheduler.submit(images(1)[0], {"iters": 3}).result(timeout=30).iterations == 3


def test_stop_answers_or_refuses_everything(pathfinder):
    scheduler = Scheduler(TorchStepper(pathfinder), slots=1)
    quick = scheduler.submit(images(1)[0], {"iters": 2})
    scheduler.stop(timeout=0)  # no time to drain: what is left is refused, never lost
    with pytest.raises(Overloaded, match="stopped before this request was answered"):
        quick.result(0)
    assert scheduler.pending() == 0
    done = scheduler.submit(images(1)[0], {"iters": 2})
    scheduler.stop()  # drains first
    assert done.result(0).iterations == 2


def test_a_cancelled_request_frees_its_slot(pathfinder):
    scheduler = Scheduler(TorchStepper(pathfinder), slots=1)
    running = scheduler.submit(images(1)[0], {"iters": 50})
    queued = scheduler.submit(images(1)[0], {"iters": 50})
    after = scheduler.submit(images(1)[0], {"iters": 2})
    scheduler.tick()
    assert running.cancel() and queued.cancel()
    assert scheduler.run_all([after])[0].iterations == 2 and scheduler.ticks <= 4
    assert scheduler.pending() == 0


def test_a_small_lane_is_not_stalled_by_a_large_one(panoptic):
    """Lanes share ticks by compute per request: small images keep moving while a large one runs."""
    scheduler = Scheduler(TorchStepper(panoptic), slots=4)
    large = scheduler.submit(images(1, (96, 96), 3)[0], {"iters": 40})
    scheduler.tick()
    small = [scheduler.submit(image, {"iters": 4}) for image in images(2, (16, 16), 3)]
    scheduler.run_all(small)
    assert not large.done()  # the small ones ran their 4 steps beside it, not after its 40
    assert scheduler.run_all([large])[0].iterations == 40

# --- the ONNX pieces on onnxruntime ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pieces_artifact(tmp_path_factory, panoptic):
    """One loop export with its pieces (the exporter's fixed cost is most of this module's time)."""
    from crbp_deploy.export import export_onnx

    path = tmp_path_factory.mktemp("pieces") / "p.onnx"
    result = export_onnx(panoptic, path, max_iters=40, tol=1e-2, example_size=(16, 16), policy="stable",
                       threshold=0.0, patience=2, pieces=True)
    result.model = panoptic  # the torch reference
    return result


def test_ort_stepper_answers_equal_the_loop_artifact(pieces_artifact):
    """Budgets differ (one group each), requests join mid-run; each answer equals the Loop artifact's solo run."""
    from crbp_deploy.runtime import load_backend

    stepper = load_stepper(pieces_artifact.path)
    assert stepper.name == "onnxruntime" and sorted(p.name for p in pieces_artifact.pieces.iterdir()) == [
        "encode.onnx", "pieces.json", "readout.onnx", "step.onnx"]
    loop = load_backend(pieces_artifact.path, threads=1)
    scheduler = Scheduler(stepper, slots=3)
    imgs = images(6, (16, 20), 3, seed=2)
    budgets = [{}, {"tol": 1e-3}, {"patience": 1}, {"iters": 3}, {"max_iters": 4, "policy": "tol"}, {"threshold": 0.05}]
    tickets = [scheduler.submit(i, b) for i, b in zip(imgs[:3], budgets[:3])]
    scheduler.tick()
    tickets += [scheduler.submit(i, b) for i, b in zip(imgs[3:], budgets[3:])]
    for image, budget, outcome in zip(imgs, budgets, scheduler.run_all(tickets)):
        if "iters" in budget or budget.get("policy") == "tol":  # the Loop cannot switch its policy off; pieces can
            heads, iterations = solo(pieces_artifact.model, image, **stepper.budget(budget).kwargs())
            assert (outcome.iterations, outcome.stopped) == (iterations, "fixed" if "iters" in budget else "cap")
            for name, value in heads.items():
                np.testing.assert_allclose(outcome.heads[name], value, rtol=0, atol=1e-4)  # onnx vs torch
            continue
        ref = loop.run(image.transpose(2, 0, 1)[None].copy(), **budget)
        assert outcome.iterations == int(ref["iterations"][0])
        for name in ref.heads:
            np.testing.assert_allclose(outcome.heads[name], ref[name], rtol=0, atol=1e-5)
    capped = scheduler.run_all([scheduler.submit(imgs[1], {"tol": 0.0}, max_cost=16 * 20 * 2.5)])[0]  # anytime
    heads, _ = solo(pieces_artifact.model, imgs[1], iters=2)
    assert (capped.stopped, capped.iterations) == ("budget", 2)
    for name, value in heads.items():
        np.testing.assert_allclose(capped.heads[name], value, rtol=0, atol=1e-4)
    with pytest.raises(InputError, match="re-export with --policy estimate"):
        scheduler.submit(imgs[0], {"policy": "estimate", "threshold": 0.1})


def test_ort_stepper_needs_current_pieces(pieces_artifact, tmp_path, run_cli, one_error_line):
    import shutil

    bare = tmp_path / "bare.onnx"
    shutil.copy(pieces_artifact.path, bare)
    with pytest.raises(InputError, match="re-export it with --pieces"):
        load_stepper(bare)
    shutil.copytree(pieces_artifact.pieces, tmp_path / "bare.onnx.pieces")
    assert load_stepper(bare).heads == ("semantic", "center", "offset")
    bare.write_bytes(bare.read_bytes() + b"\0")  # another artifact now
    with pytest.raises(Exception, match="written for another export"):
        load_stepper(bare)
    with pytest.raises(InputError, match="steps on onnxruntime, not torch"):
        load_stepper(pieces_artifact.path, backend="torch")
    one_error_line(*run_cli("export", "hgru-panoptic", "--iters", "3", "--pieces", "--out", tmp_path / "u.onnx")[::2],
                   "pieces")


def test_every_registered_model_steps_as_it_runs_alone(model_name):
    """The registry-wide contract: scheduled answers equal solo runs, for every architecture."""
    model = tiny_model(model_name)
    scheduler = Scheduler(TorchStepper(model), slots=2)
    imgs = images(3, (16, 16), model.in_channels, seed=3)
    budgets = [{"max_iters": 12, "tol": 1e-2}, {"iters": 4}, {"max_iters": 12, "tol": 1e-3}]
    outcomes = scheduler.run_all([scheduler.submit(i, b) for i, b in zip(imgs, budgets)])
    for image, budget, outcome in zip(imgs, budgets, outcomes):
        assert_solo(model, outcome, image, budget)
