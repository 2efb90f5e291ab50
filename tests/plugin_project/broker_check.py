"""Run on purpose by slabcast's own tests: the plugin must fail the test whose broker died under it, and lets a
client given no address find the test's broker."""

import os
import signal

import slabcast


def test_finds_the_broker_without_an_address(slabcast_broker, slabcast_stream_name):
    with slabcast.Publisher(slabcast_stream_name, "int16"):  # ($SLABCAST_ADDRESS: the fixture's broker)
        assert [s["name"] for s in slabcast.broker_status(slabcast_broker.address)["streams"]] == [
            slabcast_stream_name
        ]


def test_its_broker_dies(slabcast_broker):
    os.kill(slabcast_broker.pid, signal.SIGKILL)
    slabcast_broker.process.wait(10)
