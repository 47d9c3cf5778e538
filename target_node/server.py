"""Start the target node: TargetService + health + reflection on gRPC, metrics on HTTP."""

from __future__ import annotations

import logging

from services.grpc_server import RunningServer, start_node
from services.model_loading import LoadedModel
from services.rpc.specwire.v1 import target_pb2, target_pb2_grpc
from target_node.build import build_verifier
from target_node.config import TargetConfig
from target_node.servicer import TargetServicer
from target_node.verifier import Verifier

log = logging.getLogger(__name__)
SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name


def start_target(
    config: TargetConfig, loaded: LoadedModel | None = None, verifier: Verifier | None = None
) -> RunningServer[Verifier]:
    """Build the verifier (unless given; from `loaded` if given) and serve it; returns once bound."""
    verifier = verifier or build_verifier(config, loaded)
    servicer = TargetServicer(verifier, config.workers)

    def cleanup() -> None:
        servicer.stop()
        verifier.stop()

    running = start_node(
        [(target_pb2_grpc.add_TargetServiceServicer_to_server, servicer, SERVICE_NAME)],
        config,
        verifier,
        cleanup,
        verifier.metrics.registry,
        asynchronous=True,
    )
    verifier.sessions.start_reaper()
    log.info(
        "target %s (%s backend) serving on %s:%d, metrics port %s",
        verifier.model_id,
        config.backend,
        config.host,
        running.port,
        running.metrics_port,
    )
    return running
