"""The target node as a Modal class on a GPU.

    modal deploy deploy/modal_app.py                      # A100, Qwen2.5-Coder-1.5B
    SPECWIRE_MODAL_GPU=H100 modal deploy deploy/modal_app.py

then point a draft node at it: `specwire draft --target modal://specwire-target/Target`.
Weights are assembled/dequantized once into the `specwire-models` volume. Methods take and return
the same protobuf messages as the gRPC TargetService (serialized), so the draft's session logic is
shared. Modal routes each method call to any container of the class (sticky sessions exist only
for `@app.server`), so every verify carries the session's committed tokens: a container that does
not hold the session re-prefills it (counted in specwire_target_session_rebuilds_total) instead
of failing the round.
"""

import os
from pathlib import Path

import modal

APP_NAME = os.environ.get("SPECWIRE_MODAL_APP", "specwire-target")
GPU = os.environ.get("SPECWIRE_MODAL_GPU", "A100")
MODEL = os.environ.get("SPECWIRE_MODAL_MODEL", "qwen2.5-coder-1.5b-instruct")
MODELS_DIR = "/models"
ROOT = Path(__file__).resolve().parents[1]

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install("torch==2.13.0", "ninja")
    .pip_install_from_pyproject(str(ROOT / "pyproject.toml"), optional_dependencies=["models"])
    .apt_install("build-essential")  # the CUDA verify kernels are JIT-built on first start
    .add_local_python_source("services", "target_node")
)
volume = modal.Volume.from_name("specwire-models", create_if_missing=True)
app = modal.App(APP_NAME)


@app.cls(gpu=GPU, image=image, volumes={MODELS_DIR: volume}, scaledown_window=300, timeout=900)
@modal.concurrent(max_inputs=16)  # concurrent sessions share a container: their verifies batch
class Target:
    model: str = modal.parameter(default=MODEL)
    kernels: str = modal.parameter(default="auto")
    dtype: str = modal.parameter(default="bfloat16")

    @modal.enter()
    def load(self) -> None:
        from target_node.build import build_verifier
        from target_node.config import TargetConfig

        config = TargetConfig(
            model=self.model, dtype=self.dtype, kernels=self.kernels, cache_dir=Path(MODELS_DIR), metrics_port=-1
        )
        self.verifier = build_verifier(config)
        self.verifier.sessions.start_reaper()
        if not modal.is_local():
            volume.commit()  # keep dequantized weights for the next container

    @modal.exit()
    def stop(self) -> None:
        self.verifier.stop()

    @modal.method()
    def info(self) -> bytes:
        return self.verifier.info().SerializeToString()

    @modal.method()
    def open_session(self, request: bytes) -> bytes:
        from services.rpc.specwire.v1 import target_pb2

        return self.verifier.open_session(target_pb2.OpenSessionRequest.FromString(request)).SerializeToString()

    @modal.method()
    def verify(self, request: bytes, resume: bytes = b"", lineage: str = "") -> bytes:
        """One round: a trie of N candidates; `resume` rebuilds the session if this container lacks it,
        replacing this container's older session of the generation `lineage` (its first session id)."""
        from services.rpc.specwire.v1 import target_pb2

        response = self.verifier.verify_or_rebuild(
            target_pb2.VerifyRequest.FromString(request),
            target_pb2.OpenSessionRequest.FromString(resume),
            lineage=lineage,
        )
        return response.SerializeToString()

    @modal.method()
    def close_session(self, session_id: str, lineage: str = "") -> bool:
        """Close the session and this container's other sessions of its generation."""
        return self.verifier.close_session(session_id, lineage=lineage)
