"""Where training reports go, on the model group's rank 0 only: a tqdm bar, plain log lines, metrics.jsonl, wandb.

wandb must never block or crash a run: `wandb_mode=auto` is online only when an API key is configured
(WANDB_API_KEY or a ~/.netrc entry for api.wandb.ai) and offline otherwise; init runs in a thread with a
timeout, and every wandb error turns wandb off with one warning while training goes on. The config handed to
wandb is the resolved Config, which holds no secrets (tokens live in the environment / .env only).
"""

from __future__ import annotations

import json
import netrc
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sd3.train.metrics import format_metrics

WANDB_INIT_TIMEOUT_S = 90.0


def new_run_id() -> str:
    """A wandb-compatible run id, made by us so it exists (and is checkpointed) even when wandb is off."""
    return uuid.uuid4().hex[:12]


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """auto -> WANDB_MODE from the environment if set, else online with a key, else offline."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if wandb_key_configured() else "offline"


class WandbSink:
    """A wandb run that can fail at any moment without taking training down."""

    def __init__(self, project: str, run_id: str, mode: str, out_dir: Path, config: dict[str, Any]):
        self.run = None
        self.mode = resolve_wandb_mode(mode)
        if self.mode == "disabled":
            return
        result: dict[str, Any] = {}

        def start() -> None:
            try:
                import wandb

                result["run"] = wandb.init(
                    project=project, id=run_id, resume="allow", mode=self.mode, dir=str(out_dir), config=config,
                    settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, silent=True),
                )
            except BaseException as e:  # noqa: BLE001 - wandb may raise anything, including SystemExit
                result["error"] = e

        out_dir.mkdir(parents=True, exist_ok=True)
        thread = threading.Thread(target=start, name="wandb-init", daemon=True)
        thread.start()
        thread.join(WANDB_INIT_TIMEOUT_S + 10.0)
        if "run" in result:
            self.run = result["run"]
        else:
            reason = result.get("error", f"no answer after {WANDB_INIT_TIMEOUT_S:.0f} s")
            tqdm.write(f"warning: wandb ({self.mode}) could not start, training continues without it: {reason}")

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in values.items() if v is not None}, step=step)
        except Exception as e:  # noqa: BLE001
            tqdm.write(f"warning: wandb.log failed, wandb is off for the rest of the run: {e}")
            self.run = None

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(values)
        except Exception as e:  # noqa: BLE001
            tqdm.write(f"warning: wandb summary failed: {e}")

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            tqdm.write(f"warning: wandb.finish failed: {e}")
        self.run = None


class RunLogger:
    """Progress bar + a plain line every log interval + metrics.jsonl in the run folder + wandb.

    `enabled=False` (every rank but the model group's rank 0) makes every method a no-op.
    """

    def __init__(self, enabled: bool, out_dir: Path, total_steps: int, start_step: int,
                 wandb_project: str, wandb_mode: str, run_id: str, config: dict[str, Any]):
        self.enabled = enabled
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.jsonl = (out_dir / "metrics.jsonl").open("a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0)
        self.wandb = WandbSink(wandb_project, run_id, wandb_mode, out_dir, config)

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def summary(self, name: str, values: dict[str, Any]) -> None:
        """End-of-run figures as `<out_dir>/<name>.json` and wandb's run summary; metrics.jsonl keeps one record per
        logged step, each with the step's loss, which every reader of it relies on."""
        if not self.enabled:
            return
        (self.out_dir / f"{name}.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
        self.wandb.summary(values)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        # Zero skip counts are noise; a balance_advice line was printed on its own (MetricsReporter.report).
        shown = {k: v for k, v in values.items() if (not k.startswith("skipped_") or v) and k != "balance_advice"}
        brief = {k: shown[k] for k in ("loss", "lr", "images_per_s", "stall_pct") if k in shown}
        self.bar.set_postfix_str(format_metrics(brief), refresh=False)
        tqdm.write(f"step {step} {format_metrics(shown)}")
        self.wandb.log(values, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.jsonl.close()
        self.wandb.finish()
