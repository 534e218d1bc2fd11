"""The feedback service: product apps send feedback events over gRPC; they land, validated,
stamped with the app and pseudonymized, durably on the event bus for the trainer."""
