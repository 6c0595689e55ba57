"""The job functions by dotted path, which is how the API enqueues them.

RQ stores a job's function as ``module.name`` and the worker imports it; handing ``enqueue`` the
path rather than the function means the API process never imports ``kestrel.workers.jobs`` (and
with it the engine, torch and transformers). tests/unit/test_torch_free.py holds each path to a
job function of that module.
"""

from __future__ import annotations

JOBS_MODULE = "kestrel.workers.jobs"
STREAM_JOBS_MODULE = "kestrel.workers.stream_jobs"
EXPORT_JOBS_MODULE = "kestrel.workers.export_jobs"
LEDGER_JOBS_MODULE = "kestrel.workers.ledger_jobs"
STEERING_JOBS_MODULE = "kestrel.workers.steering_jobs"
#: Every module holding job functions (the worker imports them by path).
JOB_MODULES = (JOBS_MODULE, STREAM_JOBS_MODULE, EXPORT_JOBS_MODULE, LEDGER_JOBS_MODULE, STEERING_JOBS_MODULE)

LOAD_MODEL = f"{JOBS_MODULE}.load_model_job"
LAYERS = f"{JOBS_MODULE}.layers_job"
CAPTURE = f"{JOBS_MODULE}.capture_job"
TRAIN = f"{JOBS_MODULE}.train_job"
EVALUATE = f"{JOBS_MODULE}.evaluate_job"
ENCODE = f"{JOBS_MODULE}.encode_job"
DISCOVER = f"{JOBS_MODULE}.discover_job"
LABEL = f"{JOBS_MODULE}.label_job"
STEERING_PREVIEW = f"{JOBS_MODULE}.steering_preview_job"
GENERATE = f"{JOBS_MODULE}.generate_job"
ANALYSIS = f"{JOBS_MODULE}.analysis_job"
TRAIN_STREAM = f"{STREAM_JOBS_MODULE}.train_stream_job"
NEURONPEDIA_EXPORT = f"{EXPORT_JOBS_MODULE}.neuronpedia_job"
LEDGER = f"{LEDGER_JOBS_MODULE}.ledger_job"
STEERING_SWEEP = f"{STEERING_JOBS_MODULE}.steering_sweep_job"
LOGIT_CHECK = f"{STEERING_JOBS_MODULE}.logit_check_job"
GRAPH_INTERVENTION = f"{STEERING_JOBS_MODULE}.graph_intervention_job"

ALL = (
    LOAD_MODEL,
    LAYERS,
    CAPTURE,
    TRAIN,
    EVALUATE,
    ENCODE,
    DISCOVER,
    LABEL,
    STEERING_PREVIEW,
    GENERATE,
    ANALYSIS,
    TRAIN_STREAM,
    NEURONPEDIA_EXPORT,
    LEDGER,
    STEERING_SWEEP,
    LOGIT_CHECK,
    GRAPH_INTERVENTION,
)
