"""The foundation every other package stands on: shared choices and the job command line.

Nothing here imports another gradood package, so config, data, train, pipeline and jobs can all use it.
"""
