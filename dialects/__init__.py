"""One module per wire format (see shapes.py for what each reads into, registry.py for how a
request finds its dialect). Imported by the proxy, the recorder and the UI; imports none of them."""
