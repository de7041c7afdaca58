"""Command-line and process concerns: error routing, logging, process-wide settings."""
