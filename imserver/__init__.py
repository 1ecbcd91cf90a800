"""imserver: a durable instant-messaging server on Trio."""

__version__ = "0.1.0"
