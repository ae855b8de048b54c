"""Frozen models as a service: ``trd serve`` (a subset of vLLM's OpenAI-compatible completions API) and its clients.

A frozen model needs no weight sync, so the OPD teacher and any TRD refiner can run in an inference engine on other
GPUs or nodes while the trainer keeps only the student: ``data.refine.url`` serves the refiner (``ServedEngine``,
a ``Generator``), ``model.teacher_url`` the teacher's top-k scores (``ServedTeacher``). The server side needs the
``serve`` extra (FastAPI, uvicorn); the clients need httpx.
"""

from trd_lightning.serve.checkpoint import ServiceFailureCheckpoint
from trd_lightning.serve.options import ServiceError, ServiceOptions

__all__ = ["ServiceError", "ServiceFailureCheckpoint", "ServiceOptions"]
