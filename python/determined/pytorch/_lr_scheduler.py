"""`det.pytorch.LRScheduler`: a torch learning-rate scheduler and when the
harness steps it (`context.wrap_lr_scheduler(scheduler, step_mode)`)."""

import enum


class LRScheduler:
    class StepMode(enum.Enum):
        # After each epoch of the training loader.
        STEP_EVERY_EPOCH = 1
        # After each batch (every `frequency` batches).
        STEP_EVERY_BATCH = 2
        # The trial calls `scheduler.step()` itself.
        MANUAL_STEP = 3
        # After each `context.step_optimizer()` of its optimizer.
        STEP_EVERY_OPTIMIZER_STEP = 4

    def __init__(self, scheduler, step_mode, frequency=1):
        if not isinstance(step_mode, LRScheduler.StepMode):
            raise TypeError("step_mode must be a det.pytorch.LRScheduler.StepMode, not {!r}".format(step_mode))
        if int(frequency) < 1:
            raise ValueError("frequency must be at least 1")
        self.scheduler = scheduler
        self._step_mode = step_mode
        self._frequency = int(frequency)

    def step(self, *args, **kwargs):
        self.scheduler.step(*args, **kwargs)

    def get_last_lr(self):
        return self.scheduler.get_last_lr()

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict):
        self.scheduler.load_state_dict(state_dict)
