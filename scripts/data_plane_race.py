"""Why the job refuses ``--direct_running_mode=multi_threading`` (docs/RUNNERS.md): Beam's time-based output
buffer loses elements that a bundle writes while its timer thread is flushing.

    .venv/bin/python scripts/data_plane_race.py [--elements 200000] [--yield_s 0.0001]

``TimeBasedBufferingClosableOutputStream`` (``apache_beam/runners/worker/data_plane.py``), which the
multi_threading mode's in-process gRPC workers use with a one-second timer, flushes by handing the buffer's
bytes to the sender and then clearing the buffer; writes are not locked against that. Here one thread
writes encoded elements as a bundle does while the timer flushes every millisecond into a sender that, like
a queue handing bytes to the gRPC thread, may let the writer run before it returns (``--yield_s``: how
long it lets it run). The elements written in that gap are cleared with no error. It prints how many of the
written elements can be decoded from what was sent; 0 missing means this Beam version no longer loses them.
"""

from __future__ import annotations

import argparse
import queue
import time

from apache_beam.coders import coders
from apache_beam.coders.coder_impl import create_InputStream
from apache_beam.runners.worker.data_plane import TimeBasedBufferingClosableOutputStream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=200_000)
    parser.add_argument("--yield_s", type=float, default=0.0001, help="how long a flush lets the writer run")
    args = parser.parse_args()

    sent: queue.Queue = queue.Queue()

    def send(data: bytes) -> None:  # the data channel's flush callback: queue the bytes for the gRPC sender
        sent.put(data)
        time.sleep(args.yield_s)

    closed: list[bytes] = []
    stream = TimeBasedBufferingClosableOutputStream(close_callback=closed.append, flush_callback=send,
                                                    time_flush_threshold_ms=1)
    coder = coders.PickleCoder().get_impl()
    for i in range(args.elements):  # what a bundle's output operation does per element
        coder.encode_to_stream(("record", i), stream, True)
        stream.maybe_flush()
    stream.close()
    data = create_InputStream(b"".join([*sent.queue, *closed]))
    got = set()
    try:
        while data.size() > 0:
            got.add(coder.decode_from_stream(data, True)[1])
    except Exception as err:  # a flush that cleared half an element leaves the rest undecodable
        print(f"the sent bytes stop decoding: {type(err).__name__}: {err}")
    print(f"written {args.elements}, decoded {len(got)}, missing {args.elements - len(got)}")


if __name__ == "__main__":
    main()
