"""Host adapters: glue between memsafe's core and the programs that generate images (AUTOMATIC1111's WebUI).

Adapters import their host's modules lazily, inside functions, so that importing memsafe never needs a host.
"""
