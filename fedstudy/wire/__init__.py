"""The wire protocol: generated from proto/fedstudy/wire/*.proto by scripts/gen-proto.sh."""
