"""Stand-ins for native backends that crash (see ``tests.crashy``): each sends
SIGSEGV to the thread it runs in, at one moment, in the module itself (the frame
the crash is blamed on).

``pthread_kill``, not ``os.kill(os.getpid(), ...)``: a real segfault is delivered
to the thread that faulted and stops it there, while a signal sent to the process
lands on the main thread and the sender runs on, off the stack the fault
handler dumps.  (The daemon copes with that too, by looking at every thread.)
"""
