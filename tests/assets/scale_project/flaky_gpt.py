"""The GPT recipe, failing once at a chosen step so that a test can see training resume from its checkpoint."""

from pathlib import Path

from jobs.gpt import GPT


class FlakyGPT(GPT):
    def __init__(self, marker_dir: str, fail_once_at_step: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.marker_dir = Path(marker_dir)
        self.first_attempt = False

    def on_train_start(self) -> None:
        # Where each attempt starts: 0 the first time, the checkpoint's step after a restart.
        (self.marker_dir / f"start-rank{self.global_rank}-step{self.global_step}").touch()
        self.first_attempt = not (self.marker_dir / "failed").exists()

    def training_step(self, batch, batch_idx):
        if self.first_attempt and self.global_step == self.hparams.fail_once_at_step:
            (self.marker_dir / "failed").touch()
            raise RuntimeError(f"failing once on purpose at step {self.global_step}")
        return super().training_step(batch, batch_idx)
