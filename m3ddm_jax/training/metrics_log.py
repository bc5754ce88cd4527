"""Training observability: metrics.jsonl, TensorBoard event files and a progress bar.

On resume, metrics logged after the restored step (by the interrupted run) are dropped, so metrics.jsonl
reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os

from tqdm import tqdm

from m3ddm_jax import fileio

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, workdir: str, *, start_step: int, total_steps: int, write: bool = True):
        self.write_enabled = write
        self.path = os.path.join(workdir, METRICS_FILE)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not write,
                        dynamic_ncols=True)
        self.step = start_step
        self.tb = None
        if not write:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
            fileio.write_text(self.path, "".join(kept))
        from tensorboardX import SummaryWriter

        # purge_step hides events the interrupted run wrote after the restored step.
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step or None)

    def write(self, record: dict, group: str = "train") -> None:
        """One line of metrics.jsonl (a training record, or another `group`'s, e.g. validation, which gets a
        "group" field) and its scalars in TensorBoard under `group`/."""
        if not self.write_enabled:
            return
        line = record if group == "train" else {**record, "group": group}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{group}/{key}", value, record["step"])
        self.tb.flush()
        if group == "train":
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}")

    def advance(self, step: int) -> None:
        self.bar.update(step - self.step)
        self.step = step

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
