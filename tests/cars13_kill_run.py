"""Run CARS 1.3's interpolation filling on zarr_orch; with ``--kill``, SIGKILL the process the
moment the breakpoint's tiles are all written and recorded, before any GeoTIFF is written.

Usage: python cars13_kill_run.py OUT_DIR DSM CLASSIF DSM_DIR|- [--kill]
(``-`` as DSM_DIR: update DSM in place, as dsm_filling does with dsm_dir=None)
"""

from __future__ import annotations

import os
import signal
import sys

from cars.applications.application import Application

import zarr_orch.orchestrator as ocht
from zarr_orch.progress import Callback


class KillAtStageEnd(Callback):
    """Dies of SIGKILL when a breakpoint's tiles are done (GeoTIFFs come after)."""

    def on_stage_end(self, summary) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    out_dir, dsm, classif, dsm_dir = sys.argv[1:5]
    kill = "--kill" in sys.argv[5:]
    app = Application(
        "dsm_filling",
        cfg={
            "method": "interpolation",
            "fill_classification": ["1"],
            "tile_size": 128,
            "margin": 16,
        },
    )
    with ocht.Orchestrator(
        orchestrator_conf={"mode": "sequential", "progress": False},
        out_dir=out_dir,
        log_dir=os.path.join(out_dir, "logs"),
        out_yaml_path=os.path.join(out_dir, "metadata.yaml"),
    ) as orchestrator:
        if kill:
            orchestrator.add_callback(KillAtStageEnd())
        app.run(
            dsm,
            classif,
            None,
            ["1"],
            os.path.join(out_dir, "dump"),
            None,
            None,
            dsm_dir=None if dsm_dir == "-" else dsm_dir,
            orchestrator=orchestrator,
        )
        orchestrator.breakpoint()


if __name__ == "__main__":
    main()
