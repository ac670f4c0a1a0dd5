"""stylize_service.protos: the gRPC contract (protos/stylize/v1/stylize.proto) and its generated Python code."""
