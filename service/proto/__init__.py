"""Generated gRPC stubs of protos/translate.proto (see generate.py); proto types stay at the servicer edge."""
