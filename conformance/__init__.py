"""The conformance kit of the wire protocol: cases, their player and recorder (see README.md here)."""
