/*
 * internal.h: what slabcast.c (the connection, the message decoding) lends to publisher.c.  Not installed and
 * not exported: libslabcast.map exports only the sc_* API, and every name here starts with sci_.
 *
 * A publisher's connection to the broker is an sc_client (slabcast.c) made by sc_new and connected with
 * sci_connect(c, address, "pub"): the same DEALER socket, HELLO/WELCOME handshake, socket monitor, msgpack
 * buffers and error messages as a subscriber's; sc_close says BYE and frees it.
 */
#ifndef SLABCAST_INTERNAL_H
#define SLABCAST_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>

#include "slabcast.h"

/* A received message: the whole array, kind first, so that `a[SCW_<MESSAGE>_<FIELD>]` is that field. */
typedef struct msgview {
    uint64_t kind;
    const msgpack_object *a;     /* a[0] is the kind, a[1] the first field */
    uint32_t nf;                 /* fields after the kind */
} msgview;

/* sc_connect for a connection of `role` ("sub" or "pub"): HELLO with the client's version, expect WELCOME. */
int sci_connect(sc_client *c, const char *address, const char *role);
/* The default broker address into `out` ($SLABCAST_ADDRESS, else the per-user socket, as Python's); SC_EINVAL with the
 * reason in `err`. */
int sci_default_address(char *out, size_t cap, char *err, size_t errcap);

/* The client's ZeroMQ context (for more sockets: they must be closed before sc_close, which ends it), its DEALER
 * and the PAIR that receives the DEALER's monitor events (for zmq_poll). */
void *sci_context(sc_client *c);
void *sci_socket(sc_client *c);
void *sci_monitor(sc_client *c);

/* In a child of fork(): free the client's own memory, unmap its mappings and close its descriptors (the
 * parent's locks and sleeper bytes stay as they are), but touch no ZeroMQ object (the parent's I/O threads are not
 * in this process: the context and its sockets cannot be closed here; their memory stays). */
void sci_forget(sc_client *c);

/* Read the monitor's pending events; whether the connection to the broker dropped. */
bool sci_gone(sc_client *c);

/* "ipc:///path/broker.sock", as connected. */
const char *sci_address(const sc_client *c);

/* What error messages name as the place ("publisher of stream 'x' at ipc://..."). */
void sci_set_where(sc_client *c, const char *where);

/* The client's packer, its buffer emptied: pack one message, then sci_send_packed. */
msgpack_packer *sci_packer(sc_client *c);
int sci_send_packed(sc_client *c, const char *what);

/* The next message from the broker until `deadline_ms` (sci_now_ms clock; -1: forever; a deadline already past:
 * only a message waiting now), decoded into `m`, valid until the next receive: SC_OK, SC_ETIMEOUT, or
 * SC_EBROKERGONE once the connection dropped and nothing is left. */
int sci_next_msg(sc_client *c, int64_t deadline_ms, msgview *m);
int64_t sci_now_ms(void);

/* An ERROR message as a return code and message. */
int sci_broker_error(sc_client *c, const msgview *m);

/* Field readers of slabcast.c: pos and name as SCW_<MESSAGE>_<FIELD>, "FIELD"; a wrong type is SC_EPROTO. */
int sci_need_fields(sc_client *c, const msgview *m, uint32_t need);
int sci_field_uint(sc_client *c, const msgview *m, unsigned pos, const char *name, uint64_t *out);
int sci_field_text(sc_client *c, const msgview *m, unsigned pos, const char *name, char *buf, size_t cap);
int sci_field_str(sc_client *c, const msgview *m, unsigned pos, const char *name, char *buf, size_t cap);
const char *sci_kind_name(uint64_t kind);

/* A stream name of 1 to 64 characters from A-Z a-z 0-9 _ . : -. */
bool sci_valid_stream_name(const char *s);

#endif /* SLABCAST_INTERNAL_H */
