"""Start the target node: load the model, serve TargetService + health + reflection."""

from __future__ import annotations

import logging

from services.grpc_server import RunningServer, build_server
from services.model_loading import LoadedModel, load_model
from services.rpc.specwire.v1 import target_pb2, target_pb2_grpc
from target_node.config import TargetConfig
from target_node.servicer import TargetServicer
from target_node.verifier import Verifier

log = logging.getLogger(__name__)
SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name


def start_target(config: TargetConfig, loaded: LoadedModel | None = None) -> RunningServer[Verifier]:
    """Load the model (unless given) and start serving; returns once the port is bound."""
    loaded = loaded or load_model(config.model, config.dtype, config.cache_dir)
    verifier = Verifier(loaded, config)
    server, port, health_servicer = build_server(
        [(target_pb2_grpc.add_TargetServiceServicer_to_server, TargetServicer(verifier), SERVICE_NAME)],
        config.host,
        config.port,
        config.workers,
    )
    server.start()
    verifier.sessions.start_reaper()
    log.info("target %s serving on %s:%d", loaded.model_id, config.host, port)
    return RunningServer(server, port, health_servicer, verifier, verifier.stop)
