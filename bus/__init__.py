"""livepipe's bus: the message format, topic schemas, socket setup and the service runtime."""
from bus.config import BusConfig, ConfigError
from bus.message import Message, decode, encode
from bus.runtime import Service, setup_logging
from bus.topics import TOPICS, SchemaError

__all__ = ["BusConfig", "ConfigError", "Message", "Service", "SchemaError", "TOPICS",
           "decode", "encode", "setup_logging"]
