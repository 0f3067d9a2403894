"""Engine programs the gateway runs as child processes, never imports: their licences (GPL) stay out of its process.

Each is started by its adapter as `python <file>`, so it imports nothing of the gateway's; it speaks a
small framed protocol on its stdin and stdout (see the module).
"""
