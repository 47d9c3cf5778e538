"""Start the draft node: DraftService + health + reflection on gRPC, metrics on HTTP."""

from __future__ import annotations

import logging

import grpc
from prometheus_client import CollectorRegistry

from draft_node.config import DraftConfig
from draft_node.engine import DraftEngine
from draft_node.metrics import DraftMetrics
from draft_node.modal_client import ModalTargetClient
from draft_node.openai_api import HttpServer, create_app
from draft_node.proposers import load_drafter
from draft_node.servicer import DraftServicer
from draft_node.target_client import TargetClient
from draft_node.target_transport import TargetTransport
from services.errors import FailedPrecondition
from services.grpc_server import RunningServer, start_node
from services.model_loading import LoadedModel
from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc
from services.security import read_api_keys

log = logging.getLogger(__name__)
SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name


def connect_target(config: DraftConfig) -> TargetTransport:
    """`modal://app/Class` for a Modal deployment, else a gRPC address (`grpc://` optional)."""
    if config.target.startswith("modal://"):
        return ModalTargetClient(config.target)
    return TargetClient.from_config(config)


def check_target(engine: DraftEngine) -> None:
    """Refuse a target with another tokenizer before serving anything (FailedPrecondition); a target
    that is not up yet is checked again at the first request."""
    try:
        engine.target_info()
    except FailedPrecondition:
        raise
    except (grpc.RpcError, OSError, RuntimeError) as exc:
        log.warning("target %s not reachable at start-up (%s); checked at the first request", engine.config.target, exc)


def start_draft(config: DraftConfig, loaded: LoadedModel | None = None) -> RunningServer[DraftEngine]:
    """Load the draft model (unless given), check the target's tokenizer, and start serving."""
    drafter = load_drafter(config, loaded)
    target = connect_target(config)
    metrics = DraftMetrics(CollectorRegistry(), positions=config.num_speculative_tokens)
    engine = DraftEngine(drafter, target, config, metrics)
    try:
        check_target(engine)
    except FailedPrecondition:
        target.close()
        drafter.stop()
        raise
    http = (
        HttpServer(
            create_app(
                engine, config.served_model_name, read_api_keys(config.api_keys_file), config.http_max_streams
            ),
            config.host,
            config.http_port,
            config.http_tls_cert,
            config.http_tls_key,
        )
        if config.http_port >= 0
        else None
    )

    def cleanup() -> None:
        if http is not None:
            http.stop()
        target.close()
        drafter.stop()

    running = start_node(
        [(draft_pb2_grpc.add_DraftServiceServicer_to_server, DraftServicer(engine), SERVICE_NAME)],
        config,
        engine,
        cleanup,
        metrics.registry,
    )
    running.http_port = http.port if http else None
    log.info(
        "draft %s serving gRPC on %s:%d, HTTP port %s, metrics port %s; target %s",
        drafter.model_id,
        config.host,
        running.port,
        running.http_port,
        running.metrics_port,
        config.target,
    )
    return running
