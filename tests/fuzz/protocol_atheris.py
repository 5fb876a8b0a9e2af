"""The protocol-layer target under atheris (libFuzzer, coverage-guided):

    python -m tests.fuzz.protocol_atheris [libFuzzer flags] [corpus dir]

hbone and h2 are instrumented, so the input bytes that reach new branches of the protocol layer or of h2's
state machines are kept and mutated further; the input steers ``tests.fuzz.h2gen`` through atheris's
FuzzedDataProvider, so mutations change the session's structure, not only its bytes. An exception out of
the target is a finding: it is written to $HBONE_FUZZ_FINDINGS (one file per distinct place, with the
input) and the campaign goes on.
"""

from __future__ import annotations

import hashlib
import os
import sys
import traceback
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["hbone", "h2"]):
    from tests.fuzz.protocol_target import run_one

FINDINGS = Path(os.environ.get("HBONE_FUZZ_FINDINGS", "fuzz-findings"))


class DataSource:
    def __init__(self, data: bytes) -> None:
        self._fdp = atheris.FuzzedDataProvider(data)

    def pick(self, lo: int, hi: int) -> int:
        return int(self._fdp.ConsumeIntInRange(lo, hi))

    def blob(self, n: int) -> bytes:
        return bytes(self._fdp.ConsumeBytes(n))


def one_input(data: bytes) -> None:
    try:
        run_one(DataSource(data))
    except Exception:  # a finding: keep it, with where it happened, and carry on
        where = traceback.extract_tb(sys.exc_info()[2])[-1]
        signature = f"{sys.exc_info()[0].__name__} at {where.filename}:{where.lineno}"  # type: ignore[union-attr]
        FINDINGS.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha1(signature.encode()).hexdigest()[:12]
        path = FINDINGS / f"{name}.txt"
        if not path.exists():
            path.write_text(f"{signature}\n\n{traceback.format_exc()}\ninput (hex): {data.hex()}\n")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
