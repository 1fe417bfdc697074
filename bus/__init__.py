"""livepipe's bus: the message format, topic schemas, socket setup and the service runtime."""
from livepipe.bus.config import BusConfig, ConfigError
from livepipe.bus.message import Message, decode, encode
from livepipe.bus.runtime import Service, run_event_loop, setup_logging
from livepipe.bus.topics import TOPICS, SchemaError

__all__ = ["BusConfig", "ConfigError", "Message", "Service", "SchemaError", "TOPICS",
           "decode", "encode", "run_event_loop", "setup_logging"]
