"""The stylize gRPC server: servicer, job scheduling and process entry point."""
