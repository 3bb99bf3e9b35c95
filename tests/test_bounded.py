"""Bounded compute per request (issue 20): cost cap, deadline, input-scale policy, admission control,
their config errors, and `bench` with fewer images than its batch. In-process, no server: the
adversarial run against a real TorchServe is benchmarks/adversarial_load.py (docs/serving.md)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from crbp_deploy.errors import ConfigError, InputError, Overloaded
from crbp_deploy.serving.admission import ANONYMOUS, Admission
from crbp_deploy.serving.service import PanopticService, RawRequest, ServiceConfig
from serving_util import BUDGET, CATS, TINY, png, sample

TRAINED = 32  # the tiny model's card says it was evaluated at 32 px


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random panoptic model whose card records a trained scale (a checkpoint: exporting the ONNX
    takes ~20 s here, and the service's request path is the same over any backend)."""
    from crbp_deploy import checkpoint
    from crbp_deploy.models import create_model

    folder = tmp_path_factory.mktemp("bounded")
    torch.manual_seed(1)
    model = create_model("hgru-panoptic", num_classes=4, thing_classes=[0, 1], **TINY)
    meta = {"categories": CATS, "inference": {"budget": BUDGET, "postprocess": {"min_area": 4}},
            "evaluation": {"image_size": TRAINED}}
    return checkpoint.save(model, folder / "tiny.pt", meta=meta)


def plain(artifact, config: ServiceConfig) -> PanopticService:
    """A service on the model-call path (ONNX Runtime's): the deadline fits the iterations up front."""
    svc = PanopticService(artifact, config)
    svc.scheduler = None
    return svc


@pytest.fixture(scope="module")
def service(tiny):
    return plain(tiny, ServiceConfig(admission=False))


def ask(service, data: bytes, **headers) -> "Reply":  # noqa: F821
    return service.handle([RawRequest({"body": data}, {"body": "image/png"}, headers)])[0]


def noise(side: int) -> bytes:
    return png((np.random.default_rng(side).random((side, side, 3)) * 255).astype(np.uint8))


# --- config: every new limit is a typed key with one clear error ---------------------------------------
@pytest.mark.parametrize("key, value, words", [
    ("max_cost", 0, "max_cost"), ("deadline_ms", 0, "deadline_ms"), ("deadline_ms", "5s", "must be int"),
    ("scale", "huge", "scale must be one of card, native"), ("client_share", 0.0, "client_share"),
    ("capacity", -1.0, "capacity"), ("admission", "yes", "must be bool"), ("deadline", 5, "unknown key"),
])
def test_limits_are_typed_config_keys(key, value, words):
    with pytest.raises(ConfigError, match=words):
        ServiceConfig.from_dict({key: value})


def test_the_deadline_sits_well_inside_the_response_timeout():
    from crbp_deploy.serving.archive import ArchiveConfig, check_deadline

    check_deadline(ServiceConfig(), ArchiveConfig())  # the defaults: 5 s inside 120 s
    with pytest.raises(ConfigError, match="deadline_ms=60000 is not well inside response_timeout_s=120"):
        check_deadline(ServiceConfig(deadline_ms=60_000), ArchiveConfig())


# --- the input-scale policy ----------------------------------------------------------------------------
def test_working_size_follows_the_card_scale():
    from crbp_deploy.panoptic.predict import working_size

    assert working_size(256, 512, "card", 128) == (128, 256)  # shorter side to the trained scale
    assert working_size(64, 64, "card", 128) == (128, 128)  # small images are brought up to it
    assert working_size(8, 2048, "card", 128) == (8, 2048)  # ...unless that blows a strip up past 4x the scale
    assert working_size(256, 512, "native", 128) == (256, 512)
    assert working_size(256, 512, "card", None) == (256, 512)  # a card without a scale: native
    with pytest.raises(InputError, match="scale must be one of"):
        working_size(8, 8, "big", 128)


def test_restore_maps_ids_back_and_recomputes_segments():
    from crbp_deploy.panoptic.predict import Prediction, restore

    ids = np.zeros((4, 4), dtype=np.int64)
    ids[:2, :2], ids[2, 0] = 1, 2
    segs = [{"id": 1, "category_id": 1, "area": 4, "bbox": [0, 0, 2, 2]},
            {"id": 2, "category_id": 2, "area": 1, "bbox": [0, 2, 1, 1]}]
    pred = restore(Prediction(ids, segs, 3, 0.0, True), (8, 12))
    assert pred.pan_ids.shape == (8, 12)
    assert pred.segments_info[0]["area"] == 4 * 6 and pred.segments_info[0]["bbox"] == [0, 0, 6, 4]
    assert pred.segments_info[1]["bbox"] == [0, 4, 3, 2] and int((pred.pan_ids == 2).sum()) == 6
    shrunk = restore(Prediction(ids, segs, 3, 0.0, True), (2, 2))  # segment 2 vanishes: dropped
    assert [s["id"] for s in shrunk.segments_info] == [1] and set(np.unique(shrunk.pan_ids)) <= {0, 1}


def test_service_answers_at_the_original_size(service):
    body = ask(service, sample(3, 64)).body
    assert body["size"] == [64, 64] and body["scale"] == {"policy": "card", "ran_at": [TRAINED, TRAINED]}
    assert sum(s["area"] for s in body["segments_info"]) <= 64 * 64
    native = ask(service, sample(3, 64), **{"X-Scale": "native"}).body
    assert native["size"] == [64, 64] and native["scale"]["ran_at"] == [64, 64]
    assert ask(service, sample(3, 64), **{"X-Scale": "big"}).status == 400


def test_predict_decode_takes_the_schedulers_stop_reason(service):
    out = service.backend.run(np.random.rand(1, 3, 32, 32).astype(np.float32), max_iters=3, tol=0.0).outputs
    pred = service.predictor.decode({**out, "stopped": ["deadline"]}, (30, 31), BUDGET, 1.0)[0]
    assert pred.stopped == "deadline" and pred.pan_ids.shape == (30, 31)


# --- cost cap and deadline -----------------------------------------------------------------------------
def test_a_cost_that_cannot_meet_one_step_is_refused_up_front(tiny):
    svc = plain(tiny, ServiceConfig(max_cost=100 * 100, admission=False))
    started = time.perf_counter()
    reply = ask(svc, noise(256), **{"X-Scale": "native"})
    assert reply.status == 413 and "cost cap of 10000 pixel-iterations" in reply.body["message"]
    assert "X-Scale: card" in reply.body["message"] and time.perf_counter() - started < 1.0
    bound = ask(svc, noise(64), **{"X-Scale": "native", "X-Tol": "0"}).body  # 64^2 x 2 fits, x 3 does not
    assert bound["iterations"] == 2 and bound["stopped"] == "budget" and bound["budget"]["max_iters"] == 2


def test_the_deadline_is_clamped_and_bounds_the_steps(service):
    long = ask(service, sample(1, 32), **{"X-Deadline-Ms": "1e9"}).body
    assert long["budget"]["deadline_ms"] == service.config.deadline_ms  # clamped like max_iters
    for bad in ("0", "-5", "soon", "nan"):
        reply = ask(service, sample(1, 32), **{"X-Deadline-Ms": bad})
        assert reply.status == 400 and "deadline_ms" in reply.body["message"]
    saved = service.capacity, service.overhead, service.post_s_per_pixel
    service.capacity, service.overhead, service.post_s_per_pixel = 1000 * 32 * 32, 1.0, 0.0  # 1000 steps/s at 32 px
    try:
        body = ask(service, sample(1, 32), **{"X-Deadline-Ms": "20", "X-Tol": "0"}).body
        too_short = ask(service, sample(1, 32), **{"X-Deadline-Ms": "1"})
    finally:
        service.capacity, service.overhead, service.post_s_per_pixel = saved
    assert body["stopped"] == "deadline" and 1 <= body["iterations"] <= 20 * 0.8 - 1  # less the time it waited
    assert too_short.status == 413 and "1 ms deadline" in too_short.body["message"]


def test_the_scheduler_stops_a_checkpoint_at_its_deadline(tiny):
    svc = PanopticService(tiny, ServiceConfig(admission=False, max_iters_limit=10_000))
    assert svc.scheduler is not None
    svc.capacity *= 100  # the up-front fit believes the worker is fast: only the wall clock stops it
    started = time.perf_counter()
    body = ask(svc, noise(96), **{"X-Scale": "native", "X-Max-Iters": "10000", "X-Tol": "0",
                                  "X-Deadline-Ms": "300"}).body
    assert body["stopped"] == "deadline" and body["iterations"] < 10_000
    assert time.perf_counter() - started < 0.3 * 1.1 + 0.5  # the deadline, a step and the grouping


# --- admission control ---------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_admission_refuses_past_the_window_with_retry_after():
    clock = Clock()
    adm = Admission(capacity=100.0, window_s=1.0, share=0.5, clock=clock)  # 100 units clear per window
    for _ in range(4):
        adm.admit(25.0)  # anonymous: the worker's bucket only
    with pytest.raises(Overloaded) as busy:
        adm.admit(25.0)
    assert busy.value.status == 503 and busy.value.retry_after_s == 1.0 and "capacity" in str(busy.value)
    clock.now = 0.5  # half the work cleared
    adm.admit(25.0)
    adm.admit(25.0)


def test_admission_caps_one_client_at_its_share_only_when_busy():
    clock = Clock()
    adm = Admission(capacity=100.0, window_s=1.0, share=0.25, clock=clock)
    for k in range(10):  # alone at 80% of capacity: spare capacity is anyone's
        clock.now = 0.2 * k
        adm.admit(16.0, "flood")
    refused = {"flood": 0, "steady": 0}
    for k in range(10, 20):  # a second client at 50%: together past capacity, each may hold half
        clock.now = 0.2 * k
        for client, cost in (("steady", 10.0), ("flood", 16.0)):
            try:
                adm.admit(cost, client)
            except Overloaded as exc:
                assert exc.status == 429 and f"'{client}' is over its share (50%" in str(exc) and exc.retry_after_s >= 1
                refused[client] += 1
    assert refused["flood"] >= 1 and refused["steady"] == 0
    adm.admit(10.0)  # no client id: the worker's bucket only
    assert ANONYMOUS not in adm.clients


def test_a_worker_busy_handling_requests_holds_clients_to_their_share():
    clock = Clock()
    adm = Admission(capacity=100.0, window_s=1.0, share=0.25, clock=clock)
    adm.record(0.0, 0.9)  # handler calls filled 90% of the window: the queue in front is likely growing
    clock.now = 1.0
    assert adm.utilization(1.0) == pytest.approx(0.9)
    adm.admit(10.0, "flood")
    adm.admit(10.0, "steady")
    with pytest.raises(Overloaded, match="over its share"):
        adm.admit(45.0, "flood")


def test_the_service_refuses_overload_with_a_retry_after_header(tiny):
    svc = plain(tiny, ServiceConfig(deadline_ms=200, capacity=32 * 32 * 200.0))  # ~40 steps per deadline
    replies = [ask(svc, sample(k, 32), **{"X-Client-Id": "a"}) for k in range(6)]
    statuses = [r.status for r in replies]
    assert statuses[0] == 200 and set(statuses) <= {200, 429, 503} and {429, 503} & set(statuses)
    refused = next(r for r in replies if r.status != 200)
    assert int(refused.headers["Retry-After"]) >= 1 and refused.body["retry_after_s"] >= 1


# --- bench with fewer images than its batch --------------------------------------------------------------
def test_bench_latency_batches_with_fewer_images_than_eight():
    from crbp_deploy.bench import latency_batches

    stack = np.zeros((4, 3, 8, 8), dtype=np.float32)
    singles, eights = latency_batches(stack)
    assert len(singles) == 4 and len(eights) == 1 and eights[0].shape[0] == 8
    with pytest.raises(InputError, match="no held-out images"):
        latency_batches(stack[:0])


# --- the Ray engine's ports -----------------------------------------------------------------------------
def test_ray_worker_ports_stay_clear_of_the_cluster_ports():
    from crbp_deploy.serving.ray_engine import PORT_NAMES, WORKER_PORTS, RayConfig, worker_ports

    assert worker_ports(RayConfig(port=8000)) == WORKER_PORTS  # P..P+8 below Ray's range: left as is
    for port in (10000, 15000, 18490, 19995):  # the issue's --port 18490, and blocks across either edge
        low, high = worker_ports(RayConfig(port=port))
        assert high - low > 4000 and not (low <= port + len(PORT_NAMES) - 1 and port <= high)


def test_a_taken_ray_port_names_itself_and_an_alternative():
    from crbp_deploy.errors import CrbpError
    from crbp_deploy.serving.ray_engine import RayConfig, check_ports

    check_ports(RayConfig(port=18490), lambda host, port: True)
    with pytest.raises(CrbpError, match=r"in use on 127.0.0.1: node_manager 18492 \(P\+2\); .* try --port 18499$"):
        check_ports(RayConfig(port=18490), lambda host, port: port != 18492)


def test_a_client_over_its_share_is_refused_before_its_image_is_read(tiny):
    svc = plain(tiny, ServiceConfig(deadline_ms=200, capacity=32 * 32 * 200.0))
    svc.admission.record(time.monotonic() - 0.2, time.monotonic())  # a busy worker
    svc.admission.clients["flood"] = svc.admission.limit
    svc.admission.seen["steady"] = time.monotonic()  # two clients asking: half each
    reply = ask(svc, b"not even an image", **{"X-Client-Id": "flood"})
    assert reply.status == 429 and "'flood' is over its share" in reply.body["message"]
    assert ask(svc, b"not even an image", **{"X-Client-Id": "other"}).status == 400


@pytest.mark.slow  # the ONNX export with its pieces takes ~20 s on 2 cores
def test_an_onnx_archive_with_pieces_runs_through_the_scheduler(tiny, tmp_path):
    from crbp_deploy import checkpoint
    from crbp_deploy.export import export_onnx

    onnx = tmp_path / "tiny.onnx"
    export_onnx(checkpoint.load(tiny), onnx, strategy="loop", pieces=True, source=str(tiny), **BUDGET)
    svc = PanopticService(onnx, ServiceConfig(admission=False, max_iters_limit=10_000))
    assert svc.scheduler is not None and svc.scheduler.slots == 8  # one-thread ORT: rows step together exactly
    images = [sample(k, 32) for k in range(4)]
    stepped = svc.handle([RawRequest({"body": im}, {"body": "image/png"}) for im in images])
    svc.scheduler, scheduler = None, svc.scheduler
    looped = svc.handle([RawRequest({"body": im}, {"body": "image/png"}) for im in images])
    for a, b in zip(stepped, looped):
        assert (a.body["panoptic_png"], a.body["iterations"]) == (b.body["panoptic_png"], b.body["iterations"])
    svc.scheduler = scheduler
    svc.capacity *= 100  # only the wall clock can stop it now
    started = time.perf_counter()
    body = ask(svc, noise(96), **{"X-Scale": "native", "X-Max-Iters": "10000", "X-Tol": "0",
                                  "X-Deadline-Ms": "300"}).body
    assert body["stopped"] == "deadline" and time.perf_counter() - started < 0.3 * 1.1 + 0.5
