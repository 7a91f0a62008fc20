//! Small-vector helpers shared by the aggregate, the sketch and the view
//! (a leaf module, so neither depends on the other for it).

/// Before the first push: room for exactly one element. A `Vec` otherwise
/// starts at four, and a million sessions each hold one currency, one
/// customer and one sketch bucket: 160 bytes per session of empty slots.
pub fn first_of_many<T>(v: &mut Vec<T>) {
    if v.capacity() == 0 {
        v.reserve_exact(1);
    }
}
