"""The gRPC front end: protos, generated code, the servicers and the terminal chat client."""
