"""Edge-cloud offload: split a model's layers between this device and a cloud service (see PROTOCOL.md)."""
