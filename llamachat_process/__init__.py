"""What both server processes (the core and the gateway) set up the same way:
their logging and their command-line name. It imports neither of them, so the
gateway never loads the engine (or llama.cpp) to use it."""
