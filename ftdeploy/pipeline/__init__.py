"""The pipeline: the stages run on a run directory.

* `registry`: each stage declared once (`REGISTRY`: its adapter, the config keys it reads, its outputs), its
  fingerprint, the plan, and the runner (`run_stage`, `train_and_serve`) that owns the stage records.
* `context`: what an adapter is given (`Context`) and `previous`, a finished stage's typed result.
* `preflight`: the checks before any stage runs.
* adapters, by what they do: `build` (data, train, merge, export), `serve` (modelfile, register), `verify`; they map
  a Context to a library call in ftdeploy/stages/ or ftdeploy/data/ and return a typed result (ftdeploy.results).
* `artifacts`: what the stages read back from a run (prompts, GGUFs, the Modelfile spec, data digests).
"""

from .context import Context
from .registry import REGISTRY, Stage, fingerprint, plan_stages, run_stage, train_and_serve

__all__ = ["REGISTRY", "Context", "Stage", "fingerprint", "plan_stages", "run_stage", "train_and_serve"]
