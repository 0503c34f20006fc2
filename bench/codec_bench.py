"""The codec's share of an offloaded task, step by step, in one process (no broker).

1. Sending a Task: :class:`topics.task_wire.TaskEncoder` (what the device does) against building the
   pydantic model and ``Codec.encode`` (what it did), same fields, interleaved rounds.
2. Receiving a Task and a Result: ``Codec.decode`` split into its steps (the hostile-input scan,
   cbor2 and restoring bytes and arrays, pydantic's validation), to show what a hand-checked decoder
   could save at most: the validation step, which pydantic-core does in Rust.

    python -m bench.codec_bench [--rounds 7] [--number 20000]

Timings are per call, the best and the median of the rounds; expect +-30% on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections.abc import Callable

import cbor2

from bench.common import ratio
from topics.codec import Codec, from_wire, scan_cbor
from topics.models import Result, Status, Task, WireModel
from topics.task_wire import TaskEncoder

SENDER = "edge-1a2b3c"
REPLY_TO = "offload/v1/node/edge-1a2b3c/result"
PAYLOAD = b"x" * 64


def timed(steps: dict[str, Callable[[], object]], rounds: int, number: int) -> dict[str, list[float]]:
    """Microseconds per call of each step, ``rounds`` times, the steps interleaved in each round."""
    samples: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            samples[label].append(timeit.timeit(step, number=number) / number * 1e6)
    return samples


def show(samples: dict[str, list[float]]) -> None:
    for label, values in samples.items():
        print(f"  {label:34} best {min(values):6.2f} us   median {statistics.median(values):6.2f} us")


def encode_steps(codec: Codec) -> dict[str, Callable[[], object]]:
    encoder = TaskEncoder(codec, sender=SENDER, reply_to=REPLY_TO)
    def model_path() -> bytes:
        return codec.encode(Task(id="9f8e7d6c5b4a3921-17", task="noop", sender=SENDER, reply_to=REPLY_TO,
                                 created=1.7e9, attempt=1, ttl=9.5, payload=PAYLOAD))

    def encoder_path() -> bytes:
        return encoder.encode(task_id="9f8e7d6c5b4a3921-17", name="noop", created=1.7e9, attempt=1,
                              ttl=9.5, payload=PAYLOAD, stage=None)

    assert model_path() == encoder_path()
    return {"Task model + Codec.encode": model_path, "TaskEncoder.encode": encoder_path}


def decode_steps(codec: Codec, message: WireModel) -> dict[str, Callable[[], object]]:
    """The decode and its steps; validation is timed on fresh input (new strings each call, as
    off the wire), as the difference of the last two steps."""
    model = type(message)
    data = codec.encode(message)
    name = model.__name__
    return {f"{name}: Codec.decode, all of it": lambda: codec.decode(data, model),
            f"{name}:   scan_cbor": lambda: scan_cbor(data),
            f"{name}:   cbor2.loads + from_wire": lambda: from_wire(cbor2.loads(data)),
            f"{name}:   ... + model_validate": lambda: model.model_validate(from_wire(cbor2.loads(data)))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=20_000, help="calls per step and round")
    args = parser.parse_args(argv)
    codec = Codec("cbor")
    print("sending a no-op Task (64 B payload), CBOR")
    sent = timed(encode_steps(codec), args.rounds, args.number)
    show(sent)
    fastest = {label: min(values) for label, values in sent.items()}
    faster = ratio(fastest["TaskEncoder.encode"], fastest["Task model + Codec.encode"])
    print(f"  {'ratio TaskEncoder / model path':34} {faster} (best of each)")
    task = Task(id="9f8e7d6c5b4a3921-17", task="noop", sender=SENDER, reply_to=REPLY_TO, created=1.7e9,
                ttl=9.5, payload=PAYLOAD)
    result = Result(task_id=task.id, status=Status.OK, server="srv-4d5e6f", task="noop", payload=PAYLOAD,
                    queue_wait=1.2e-4, service_time=2.1e-5)
    for message in (task, result):
        print(f"\nreceiving a {type(message).__name__}, CBOR")
        steps = timed(decode_steps(codec, message), args.rounds, args.number)
        show(steps)
        best = [min(values) for values in steps.values()]
        whole, validation = best[0], best[3] - best[2]
        print(f"  {'share of pydantic validation':34} {validation / whole:.0%} of the decode (best of each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
