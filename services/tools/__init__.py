"""Debugging verbs on the bus: tap, top, record, replay, export, say, keys."""
