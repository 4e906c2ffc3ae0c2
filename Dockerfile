FROM python:3.11-slim
WORKDIR /app
# constraints.txt pins every dependency, transitively, at the versions the test suite passed
# on (regenerate it with `python .ci/constraints.py > constraints.txt`).
COPY pyproject.toml README.md constraints.txt ./
COPY worker ./worker
COPY tasks ./tasks
COPY storage ./storage
COPY emulator ./emulator
RUN pip install --no-cache-dir -c constraints.txt '.[flower]' \
    && useradd --create-home poller && mkdir -p /handlers
# Python handlers (@on(...), HIPCHAT_POLLER_HANDLERS_MODULE) are imported from here:
# docker-compose.yml mounts a directory of the host on it.
ENV PYTHONPATH=/handlers
USER poller
ENTRYPOINT ["hipchat-poller"]
CMD ["worker"]
