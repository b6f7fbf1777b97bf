"""`chorus bench synth`: throughput of corpus synthesis (utterances/s), one worker against every core.

Both runs synthesize the same corpus (same seed) into fresh directories, side by side in one process, so the ratio
is the speed-up of ``synthesize``'s process pool on this machine. CPU time of the workers is not measured here
(the pool's children are reaped inside ``synthesize``); wall time is what a user waits.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.data.synth import synthesize
from simulations.simulate import available_cores

__all__ = ["run_synth_bench"]


def run_synth_bench(*, speakers: int, utterances: int, seed: int = 17) -> dict[str, Any]:
    """Wall time and utterances/s of synthesizing ``speakers`` x ``utterances`` with 1 worker and with all cores."""
    cores = available_cores()
    result: dict[str, Any] = {"speakers": speakers, "utterances_per_speaker": utterances, "cores": cores}
    with tempfile.TemporaryDirectory(prefix="chorus-bench-synth-") as tmp:
        for label, workers in (("one_worker", 1), ("all_cores", cores)):
            start = time.monotonic()
            synthesize(Path(tmp) / label, speakers=speakers, utterances=utterances, seed=seed, workers=workers, progress=False)
            seconds = time.monotonic() - start
            result[label] = {
                "workers": workers,
                "seconds": round(seconds, 2),
                "utterances_per_second": round(speakers * utterances / seconds, 2),
            }
    result["speedup"] = round(result["one_worker"]["seconds"] / result["all_cores"]["seconds"], 2)
    return result


def main(*, quick: bool, as_json: bool) -> None:
    result = run_synth_bench(speakers=4 if quick else 40, utterances=3 if quick else 10)
    if as_json:
        print(json.dumps(result))
    else:
        for label in ("one_worker", "all_cores"):
            r = result[label]
            print(f"{label}: {r['workers']} worker(s), {r['seconds']} s, {r['utterances_per_second']} utterances/s")
        print(f"speed-up {result['speedup']}x on {result['cores']} cores")
