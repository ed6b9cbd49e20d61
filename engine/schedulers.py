"""The one registry of scheduler names: the request field, the proto enum, the CLI and the engine use it."""

from __future__ import annotations

# name -> diffusers class; "" is the base model's own scheduler. The proto enum `Scheduler` has one
# value per name (SCHEDULER_<NAME>, SCHEDULER_UNSPECIFIED for ""): tests/test_engine_schedulers.py.
SCHEDULER_CLASSES = {"": None, "ddim": "DDIMScheduler", "dpm_solver_multistep": "DPMSolverMultistepScheduler",
                     "euler": "EulerDiscreteScheduler"}
SCHEDULERS = tuple(SCHEDULER_CLASSES)


def make_scheduler(base_scheduler, name: str):
    """A fresh scheduler: the base's own class for "", else diffusers' class `from_config` of the base's.

    Fixed up as `StableDiffusionPipeline.__init__` fixes the scheduler it is given (``steps_offset``
    1, ``clip_sample`` off: clipping x0 to [-1, 1] is wrong for latents), so that a pipeline built
    with this scheduler runs exactly this one.
    """
    import diffusers

    cls = type(base_scheduler) if name == "" else getattr(diffusers, SCHEDULER_CLASSES[name])
    scheduler = cls.from_config(base_scheduler.config)
    fixes = {key: value for key, value in (("steps_offset", 1), ("clip_sample", False))
             if key in scheduler.config and scheduler.config[key] != value}
    if not fixes:
        return scheduler
    # from_config would reset the keys `_use_default_values` lists (clip_sample is one) to the defaults.
    config = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    return cls.from_config({**config, **fixes})
